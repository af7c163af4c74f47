"""The trainer's mismatch metrics on 2 gloo processes are the global batch's, as one process computes them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klbelt.kl.mismatch import mismatch_stats
from klbelt.rl.distributed import World
from klbelt.rl.rollout import Rollout
from klbelt.rl.samplers import RolloutCorrection, mismatch_metrics
from tiny_models import tiny_gpt2

B, P, R, V = 8, 3, 6, 12
KEYS = ("mismatch_kl", "mismatch_k3", "mismatch_max_logratio", "is_weight_mean", "is_weight_min", "is_weight_max",
        "is_clipped_frac")


def _batch():
    """A global batch whose halves hold very different numbers of valid tokens (rank 1's rows are short),
    with the largest log-ratio and the smallest weight on rank 1: a mean of per-rank means, or a rank's
    own max/min, differs from the global value."""
    g = torch.Generator().manual_seed(0)
    sampler = -torch.rand(B, R, generator=g, dtype=torch.float64) * 3 - 0.05
    delta = torch.randn(B, R, generator=g, dtype=torch.float64) * 0.4
    lengths = torch.tensor([6, 6, 5, 6, 1, 2, 0, 1])
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    delta[5, 1], delta[7, 0] = 1.5, -2.0  # rank 1 holds max|delta| and min w
    trainer = (sampler + delta).clamp(max=-1e-3)
    sequences = torch.randint(1, V, (B, P + R), generator=g)
    return trainer.float(), sampler.float(), mask, sequences


def _rank_metrics(rows: slice, world: World) -> dict:
    trainer, sampler, mask, sequences = _batch()
    out = {}
    for correction in ("off", "tis", "band"):
        rc = RolloutCorrection("bf16", correction, cap=1.5, band=(0.6, 1.5))
        weights, clipped = rc.weights(trainer[rows], sampler[rows], mask[rows])
        out[correction] = mismatch_metrics(trainer[rows], sampler[rows], mask[rows], weights, clipped, world)
    # through RolloutCorrection itself: the world is the default process group's, found without being passed
    model = tiny_gpt2(V, n_layer=1, seed=1)
    full = torch.ones(B, P + R, dtype=torch.long)
    roll = Rollout(sequences[rows], full[rows], P, mask[rows], sampler[rows])
    _, _, out["call"] = RolloutCorrection("bf16", "tis", cap=1.5)(model, roll, 1.0)
    return out


def _worker(rank: int, init_file: str, result_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        world = World.current()
        result = _rank_metrics(world.shard(B), world)
        with open(f"{result_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()


def test_one_process_metrics_are_mismatch_stats_and_importance_weights_of_the_whole_batch():
    trainer, sampler, mask, _ = _batch()
    one = _rank_metrics(slice(0, B), World())
    stats = mismatch_stats(trainer, sampler, mask)
    valid = mask > 0
    raw = (trainer.double() - sampler.double()).exp()[valid]
    for correction, (lo, hi) in (("off", (0.0, float("inf"))), ("tis", (0.0, 1.5)), ("band", (0.6, 1.5))):
        got = one[correction]
        assert got["mismatch_kl"] == pytest.approx(float(stats["k1"]), abs=1e-12)
        assert got["mismatch_k3"] == pytest.approx(float(stats["k3"]), abs=1e-12)
        assert got["mismatch_max_logratio"] == pytest.approx(float(stats["max_abs_log_ratio"]), abs=1e-12)
        # brute force: the raw weights, truncated at the cap (tis) or zeroed outside the band (band)
        w = raw.clamp(max=hi) if correction != "band" else torch.where((raw < lo) | (raw > hi), 0.0, raw)
        changed = (raw > hi) | ((raw < lo) if correction == "band" else torch.zeros_like(raw, dtype=torch.bool))
        assert got["is_weight_mean"] == pytest.approx(float(w.mean()), rel=1e-6)
        assert got["is_weight_min"] == pytest.approx(float(w.min()), rel=1e-6)
        assert got["is_weight_max"] == pytest.approx(float(w.max()), rel=1e-6)
        assert got["is_clipped_frac"] == pytest.approx(float(changed.double().mean()), abs=1e-12)
    assert one["tis"]["is_clipped_frac"] > 0 and one["band"]["is_weight_min"] == 0.0


@pytest.mark.slow
def test_two_processes_report_the_global_batchs_mismatch_metrics(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(results)), nprocs=2, join=True)
    rank0 = json.loads((results / "rank0.json").read_text())
    rank1 = json.loads((results / "rank1.json").read_text())
    assert rank0 == rank1  # every rank holds the same, global, numbers
    one = _rank_metrics(slice(0, B), World())
    for correction in ("off", "tis", "band", "call"):
        for key in KEYS:
            assert rank0[correction][key] == pytest.approx(one[correction][key], rel=1e-6, abs=1e-9), (correction, key)
    # the local values were really different: a per-rank (unreduced) metric would fail the comparison above
    local0 = _rank_metrics(slice(0, B // 2), World())
    assert local0["off"]["mismatch_max_logratio"] < one["off"]["mismatch_max_logratio"]
    assert local0["off"]["is_weight_min"] > one["off"]["is_weight_min"]
    assert abs(local0["off"]["mismatch_kl"] - one["off"]["mismatch_kl"]) > 1e-3
