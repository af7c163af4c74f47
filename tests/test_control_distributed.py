"""Rank consistency: ranks that see different local KLs end with identical beta trajectories."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klbelt import AdaptiveKLController, PIDKLController, global_observed_kl

WORLD = 2
STEPS = 30


def _local_batch(rank: int, step: int):
    """Per-token KL values of one rank at one step: different values and counts on each rank."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    n_tokens = 37 if rank == 0 else 101  # unequal counts: a mean of per-rank means would be wrong
    scale = 0.01 if rank == 0 else 0.05
    return torch.rand(n_tokens, generator=gen, dtype=torch.float32) * scale * (1 + step / 10)


def _controllers():
    return {
        "step": AdaptiveKLController(0.1, 0.02),
        "proportional": AdaptiveKLController(0.1, 0.02, horizon=5000, rule="proportional"),
        "pid": PIDKLController(0.1, 0.02),
    }


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        controllers = _controllers()
        trajectory = {name: [] for name in controllers}
        observed = []
        for step in range(STEPS):
            kl = _local_batch(rank, step)
            global_kl = global_observed_kl(kl.sum(), kl.numel())
            observed.append(float(global_kl))
            for name, c in controllers.items():
                trajectory[name].append(c.update(global_kl, n_steps=138))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"observed": observed, "beta": trajectory}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_local_kl_end_with_identical_beta_trajectories(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert runs[0] == runs[1]  # bitwise: same observations, same betas on every rank

    # and the observation is the mean over the concatenated global batch, not a mean of rank means
    controllers = _controllers()
    for step in range(STEPS):
        both = torch.cat([_local_batch(r, step) for r in range(WORLD)]).double()
        assert runs[0]["observed"][step] == pytest.approx(float(both.mean()), rel=1e-6)
        for name, c in controllers.items():
            assert runs[0]["beta"][name][step] == pytest.approx(c.update(float(both.mean()), n_steps=138), rel=1e-6)
    mean_of_means = sum(float(_local_batch(r, 0).mean()) for r in range(WORLD)) / WORLD
    assert abs(runs[0]["observed"][0] - mean_of_means) > 1e-3
    assert len(set(runs[0]["beta"]["pid"])) > 5  # the controllers actually moved
