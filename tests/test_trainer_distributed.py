"""The trainer on 2 gloo processes: same beta on every rank, same run as 1 process on the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klbelt.rl.config import TrainConfig
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["good", "bad", "day", "night", "is", "the", "a"]
PROMPTS = ["the day", "the night is", "a good", "bad", "the", "night", "a day is", "good day"]
CONFIGS = {
    # PPO with a critic, k1 in the reward, the PID controller in nats/token
    "gae-reward": dict(advantage="gae", kl_in="reward", controller="pid", kl_coef=0.2, target_kl=0.01),
    # GRPO-style: group baseline, k3 in the loss, step controller on nats/sequence, EOS may end responses early
    "group-loss": dict(advantage="group", group_size=2, kl_in="loss", kl_estimator="k3", controller="adaptive",
                       kl_unit="seq-sum", kl_coef=0.2, target_kl=0.05),
    # top-p as a sampler: pi recomputed, token IS weights, the exact KL at the visited states, filtered_mass
    "top-p": dict(advantage="gae", kl_in="reward", controller="pid", kl_coef=0.2, target_kl=0.01, top_p=0.8,
                  rollout_correction="tis"),
    # TR-DPO's hard update every 2 updates (each rank resets its own copy of the reference)
    "ref-sync": dict(advantage="group", group_size=2, kl_in="loss", kl_estimator="k3", controller="adaptive",
                     kl_coef=0.2, target_kl=0.05, ref_sync_every=2),
}


_CALLS = [0]


def score_good(texts):
    """+1 per 'good', -1 per 'bad'.

    With $KLBELT_TEST_HANG_AT set to N, the process's N-th call (0-based: step N) blocks forever, so a test
    can kill a run at a known step however fast the steps are."""
    hang_at = os.environ.get("KLBELT_TEST_HANG_AT")
    if hang_at is not None and _CALLS[0] == int(hang_at):
        import time

        while True:
            time.sleep(1)
    _CALLS[0] += 1
    return torch.tensor([t.split().count("good") - t.split().count("bad") for t in texts], dtype=torch.float32)


def _config(out, **extra) -> TrainConfig:
    values = dict(steps=4, batch_size=8, max_new_tokens=5, ppo_epochs=2, lr=1e-2, critic_lr=1e-2, checkpoint_every=2)
    return TrainConfig(**{**values, **extra}, out=str(out))


def _run(cfg: TrainConfig) -> list[dict]:
    from klbelt.rl.trainer import train

    torch.set_num_threads(1)
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=2, seed=3)
    return train(cfg, model, tok, PROMPTS, score_good, warn_alerts=False)


def _worker(rank: int, world: int, init_file: str, out: str, name: str, result_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank:  # only rank 0 may write the run's files
            import klbelt.rl.io as io
            import klbelt.rl.run_files as run_files
            import klbelt.rl.run_state as run_state

            def forbidden(*args, **kwargs):
                raise AssertionError(f"rank {rank} wrote a file")

            run_state.atomic_torch_save = run_files.atomic_write_text = forbidden
            io.atomic_torch_save = io.atomic_write_text = io.JsonlLog.append = io.JsonlLog.sync = forbidden
        history = _run(_config(out, **CONFIGS[name]))
        with open(f"{result_dir}/rank{rank}.json", "w") as f:
            json.dump(history, f)
    finally:
        dist.destroy_process_group()


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_close(a: list[dict], b: list[dict], rel: float):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            va, vb = ra[key], rb[key]
            if key == "kl_neg_frac" and abs(ra["kl"]) < 1e-6:  # right after a ref sync: the sign of rounding noise
                continue
            if isinstance(va, float):
                assert math.isclose(va, vb, rel_tol=rel, abs_tol=1e-6), (ra["step"], key, va, vb)
            else:
                assert va == vb, (ra["step"], key, va, vb)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_hold_one_beta_and_match_one_process_on_the_same_global_batch(tmp_path, name):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), name, str(results)), nprocs=2, join=True)
    rank0 = json.loads((results / "rank0.json").read_text())
    rank1 = json.loads((results / "rank1.json").read_text())
    # every rank computed the same global metrics, beta included, bit for bit
    assert _strip(rank0) == _strip(rank1)
    assert [r["kl_coef"] for r in rank0] == [r["kl_coef"] for r in rank1]
    assert len({r["kl_coef"] for r in rank0}) > 1, "the controller must move beta for this test to mean something"

    one = _run(_config(tmp_path / "one", **CONFIGS[name]))
    # same prompts, same samples, same global means: equal up to float summation order
    _assert_close(_strip(rank0), _strip(one), rel=1e-4)
    written = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert _strip(written) == _strip(rank0)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    cfg = _config(tmp_path, batch_size=8, group_size=2, advantage="group")  # 4 prompts per update
    import klbelt.rl.trainer as trainer

    original = trainer.World.current
    trainer.World.current = classmethod(lambda cls: cls(rank=0, size=3))
    try:
        with pytest.raises(ValueError, match="must split into 3 processes"):
            _run(cfg)
    finally:
        trainer.World.current = original


@pytest.fixture()
def model_dir(tmp_path):
    tok = word_tokenizer(WORDS)
    path = tmp_path / "model"
    tiny_gpt2(len(tok), n_layer=2, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cli(*args, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "klbelt", "train", *args], env=env, capture_output=True, text=True, timeout=300)


def _popen(*args, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "klbelt", "train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _processes_naming(path) -> list[int]:
    """Live processes (not zombies) whose command line contains ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_klbelt_train_nproc_2_matches_one_process_and_resumes_after_sigkill(tmp_path, model_dir):
    import signal
    import time

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    values = dict(model=str(model_dir), prompts=str(prompts), reward="test_trainer_distributed:score_good",
                  steps=6, batch_size=8, max_new_tokens=5, ppo_epochs=2, lr=1e-2, checkpoint_every=2,
                  controller="pid", kl_coef=0.2, target_kl=0.01)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    done = _cli("--config", str(config), "--out", str(one))
    assert done.returncode == 0, done.stderr
    done = _cli("--config", str(config), "--out", str(two), "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stdout and done.stdout.count("klbelt train:") == 1  # rank 0 alone prints

    def rows(run):
        return _strip([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])

    _assert_close(rows(two), rows(one), rel=1e-4)
    assert (two / "policy" / "config.json").exists()

    # the whole job (torchrun and both workers) killed after step 3: resume on 2 processes
    # every rank's reward blocks at step 5, so the kill lands mid-run however fast the steps are
    proc = _popen("--config", str(config), "--out", str(killed), "--nproc", "2", KLBELT_TEST_HANG_AT="5")
    metrics, deadline = killed / "metrics.jsonl", time.time() + 240
    # kill once step 4's line is written: the step-4 checkpoint was saved before step 4 began
    # (right after step 3's line), and step 5 is blocked in its reward
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # klbelt's launcher and torchrun; the workers run in sessions of their own
    proc.wait(30)
    # the workers die with torchrun (PR_SET_PDEATHSIG): none is left to write into the folder being resumed
    survivors, deadline = _processes_naming(killed), time.time() + 30
    while survivors and time.time() < deadline:
        time.sleep(0.1)
        survivors = _processes_naming(killed)
    for pid in survivors:  # (they would wait in their reward forever)
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers outlived the killed launcher: {survivors}"
    assert 5 <= len(metrics.read_text().splitlines()) < 6, "the kill must land mid-run"
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 4
    import shutil

    shutil.copytree(killed, tmp_path / "killed-then-one")
    again = _cli("--resume", str(killed), "--nproc", "2")
    assert again.returncode == 0, again.stderr
    assert rows(killed) == rows(two)
    # the checkpoint holds no per-rank state: the same run resumed on 1 process ends the same
    again = _cli("--resume", str(tmp_path / "killed-then-one"))
    assert again.returncode == 0, again.stderr
    _assert_close(rows(tmp_path / "killed-then-one"), rows(two), rel=1e-4)


def test_nproc_refuses_a_batch_that_does_not_split_before_starting_any_process(tmp_path, model_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model=str(model_dir), prompts="demo", steps=1, batch_size=3, out=str(tmp_path / "run"))))
    done = _cli("--config", str(config), "--nproc", "2")
    assert done.returncode == 2
    assert "--nproc 2" in done.stderr and "split evenly" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_nproc_reports_a_bad_input_found_by_the_workers_once_without_the_launchers_traceback(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model=str(tmp_path / "no-model"), steps=1, batch_size=2, out=str(tmp_path / "run"))))
    done = _cli("--config", str(config), "--nproc", "2")
    assert done.returncode == 2
    assert done.stderr.count("klbelt train: error: model") == 1, done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
