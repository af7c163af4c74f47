"""Crash safety of `klbelt train`.

- SIGKILL at any moment (random moments, and inside checkpoint writes through the
  KLBELT_FAULT hook of klbelt.rl.io) followed by `klbelt train --resume DIR`, as
  often as it takes, ends with exactly the metrics of an uninterrupted run and no
  temporary files. The killed runs are forked from a process that imported torch and
  transformers once (`_ForkServer`, ~5 s saved a run); the reference is a plain subprocess.
- A read-only output directory or a full disk gives one clear line before training;
  a disk that fills mid-run gives a clear error and keeps the last checkpoint.

Read-only directories and small disks are real: a read-only bind mount and a tmpfs,
made in a private mount namespace (`unshare -m`, or `unshare -rm` without root) that
dies with the command, so nothing leaks onto the machine.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
WORDS = ["good", "bad", "day", "night", "is", "the"]
STEPS = 12
RUN = dict(reward="test_cli_train:score_good", steps=STEPS, batch_size=4, max_new_tokens=4, checkpoint_every=3,
           samples_every=2, kl_coef=0.2, target_kl=0.01, lr=1e-2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
ENV.pop("KLBELT_FAULT", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import tiny_gpt2, word_tokenizer

    tok = word_tokenizer(WORDS)
    path = tmp_path_factory.mktemp("faults") / "model"
    tiny_gpt2(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(directory: Path, model_dir: Path, out: Path, **values) -> Path:
    prompts = directory / "prompts.txt"
    prompts.write_text("the day\nthe night is\ngood\n")
    cfg = directory / f"{out.name}.json"
    cfg.write_text(json.dumps({**RUN, "model": str(model_dir), "prompts": str(prompts), "out": str(out), **values}))
    return cfg


def _klbelt(*args, fault: str | None = None, prefix: tuple = ()) -> subprocess.Popen:
    env = {**ENV, "KLBELT_FAULT": fault} if fault else ENV
    return subprocess.Popen([*prefix, sys.executable, "-m", "klbelt", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def _temps(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp" in p.name or ".write-test" in p.name)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _written_since(path: Path, t_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= t_ns
    except FileNotFoundError:
        return False


# --- the SIGKILL sweep ---------------------------------------------------------------------------------

FAULTS = [  # kills inside atomic writes (klbelt.rl.io's KLBELT_FAULT hook): one chain, killed 4 times
    ("fault", "atomic-write:checkpoint.pt:mid-write:1"),  # the first checkpoint, half written: none exists yet
    ("fault", "atomic-write:checkpoint.pt:after-fsync:2"),  # complete temp file, not renamed
    ("fault", "atomic-write:checkpoint.pt:after-rename:1"),  # renamed, directory not synced
    ("fault", "atomic-write:metrics.jsonl:mid-write:1"),  # the resume's trim of metrics.jsonl
]


def _random_chains(seed: int = 20261124) -> list[list[tuple]]:
    """Kills from outside at random moments: once metrics.jsonl holds k lines (written by this
    process), sleep a random 0-40 ms (a step takes ~50 ms), then SIGKILL. k=0 waits for config.json
    (written just before the first step): a kill before any checkpoint exists."""
    rng = random.Random(seed)

    def at(lo, hi):
        return ("at", rng.randint(lo, hi), rng.uniform(0.0, 0.04))

    return [
        [("at", 0, rng.uniform(0.0, 0.04)), at(4, 8), at(9, 11)],
        [at(1, 2), at(5, 11)],
        [at(2, 11), ("at", STEPS, rng.uniform(0.0, 0.3))],  # after the last step: report, policy/
    ]


_FORK_SERVER = r"""
# Runs `python -m klbelt ARGS` in forked children of one process that has imported torch,
# transformers and klbelt once (saving ~5 s a run). Protocol, one JSON line each way:
# ["start", argv, env, stderr_path] -> pid;  ["poll", pid] -> exit code or null;  ["wait", pid] -> exit code.
import json, os, runpy, sys, traceback
import torch, transformers, matplotlib.pyplot, klbelt.cli.main, klbelt.cli.train, klbelt.rl.trainer, klbelt.monitor
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel
import test_cli_train

def code(status):
    return os.waitstatus_to_exitcode(status)

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "start":
        _, argv, env, stderr_path = cmd
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.dup2(os.open(os.devnull, os.O_RDWR), 0)
                os.dup2(os.open(os.devnull, os.O_RDWR), 1)
                os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                os.environ.clear(); os.environ.update(env)
                sys.argv = ["klbelt", *argv]
                try:
                    runpy.run_module("klbelt", run_name="__main__", alter_sys=True)
                    rc = 0
                except SystemExit as exc:
                    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(rc)
        reply = pid
    elif cmd[0] == "poll":
        pid, status = os.waitpid(cmd[1], os.WNOHANG)
        reply = code(status) if pid else None
    else:
        reply = code(os.waitpid(cmd[1], 0)[1])
    print(json.dumps(reply), flush=True)
"""


class _ForkServer:
    """`python -m klbelt ...` runs as children of a pre-imported process, killed with a real SIGKILL."""

    def __init__(self, workdir: Path):
        self.workdir, self.n = workdir, 0
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], env=ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, *cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def klbelt(self, *args, fault: str | None = None) -> "_Child":
        self.n += 1
        stderr = self.workdir / f"stderr-{self.n}.txt"
        env = {**ENV, "KLBELT_FAULT": fault} if fault else ENV
        return _Child(self, self._ask("start", [str(a) for a in args], env, str(stderr)), stderr)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


class _Child:
    def __init__(self, server, pid, stderr):
        self.server, self.pid, self.stderr, self.returncode = server, pid, stderr, None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.server._ask("poll", self.pid)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout=None):
        if self.returncode is None:
            self.returncode = self.server._ask("wait", self.pid)
        return None, self.stderr.read_text()


def _run_chain(name: str, chain: list[tuple], cfg: Path, out: Path, klbelt=_klbelt) -> list[dict]:
    """Start the run, kill it at each point of ``chain`` (resuming in between), then resume to the end."""
    log = []
    for action in [*chain, ("finish",)]:
        ckpt_before = (out / "checkpoint.pt").exists()
        args = ("train", "--resume", out) if log else ("train", "--config", cfg)
        for attempt in range(2):
            t0 = time.time_ns()
            proc = klbelt(*args, fault=action[1] if action[0] == "fault" else None)
            killed_at = None
            if action[0] == "at":
                k, pause = action[1], action[2]
                deadline = time.time() + 180
                while proc.poll() is None and time.time() < deadline:
                    if (k == 0 and _written_since(out / "config.json", t0)) or (
                        k > 0 and _written_since(out / "metrics.jsonl", t0) and _lines(out / "metrics.jsonl") >= k
                    ):
                        time.sleep(pause)
                        killed_at = _lines(out / "metrics.jsonl")
                        proc.send_signal(signal.SIGKILL)
                        break
                    time.sleep(0.005)
            _, err = proc.communicate(timeout=180)
            # A run killed before its first checkpoint resumes from step 0 (with a warning); one
            # killed before it wrote config.json cannot be resumed (a clear error) and is started
            # again from its config.
            if args[1] == "--resume" and proc.returncode == 2 and not ckpt_before:
                assert "config.json: cannot be read" in err, err
                assert "Traceback" not in err, err
                log.append({"action": "resume-refused", "stderr": err.strip().splitlines()[-1]})
                args = ("train", "--config", cfg)
                continue
            break
        entry = {"chain": name, "action": action, "rc": proc.returncode, "lines_at_kill": killed_at,
                 "checkpoint_existed": (out / "checkpoint.pt").exists(), "temps": _temps(out)}
        log.append(entry)
        if action[0] == "finish":
            assert proc.returncode == 0, f"{name}: the final resume failed: {err[-3000:]}\n{log}"
        elif action[0] == "fault":
            assert proc.returncode == -signal.SIGKILL, f"{name}: {action} did not fire (rc {proc.returncode}): {err[-3000:]}"
        else:
            assert proc.returncode in (-signal.SIGKILL, 0), f"{name}: {action}: rc {proc.returncode}: {err[-3000:]}"
    return log


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_metrics(tmp_path, model_dir):
    whole = tmp_path / "whole"
    chains = {"faults": FAULTS, **{f"random{i}": c for i, c in enumerate(_random_chains())}}

    def uninterrupted():
        proc = _klbelt("train", "--config", _config(tmp_path, model_dir, whole))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    t0 = time.time()
    # The reference is a plain `python -m klbelt train`; the killed runs go through two fork servers
    # (one per core), each working through its chains one after the other.
    servers = [_ForkServer(tmp_path) for _ in range(2)]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            ref = pool.submit(uninterrupted)
            names = list(chains)
            queues = [names[i::2] for i in range(2)]

            def work(server, queue):
                return {n: _run_chain(n, chains[n], _config(tmp_path, model_dir, tmp_path / n), tmp_path / n, server.klbelt)
                        for n in queue}

            jobs = [pool.submit(work, server, queue) for server, queue in zip(servers, queues)]
            ref.result()
            logs = {n: log for job in jobs for n, log in job.result().items()}
    finally:
        for server in servers:
            server.close()
    print(f"sweep: {time.time() - t0:.0f} s")
    report = "\n".join(json.dumps(e, default=str) for log in logs.values() for e in log)
    print(report)

    kills = [e for log in logs.values() for e in log if e.get("rc") == -signal.SIGKILL]
    assert len(kills) >= 10, f"only {len(kills)} kills landed:\n{report}"
    assert any(not e["checkpoint_existed"] for e in kills), f"no kill before the first checkpoint:\n{report}"
    # every kill inside a checkpoint write left a temp file (or none, after the rename) that the resume removed
    assert any(e["temps"] for e in kills), f"no kill left a temporary file to clean up:\n{report}"
    for name in chains:
        out = tmp_path / name
        assert _rows(out / "metrics.jsonl") == _rows(whole / "metrics.jsonl"), f"{name}: metrics differ\n{report}"
        assert _rows(out / "samples.jsonl") == _rows(whole / "samples.jsonl"), f"{name}: samples differ\n{report}"
        assert _rows(out / "token_kl.jsonl") == _rows(whole / "token_kl.jsonl"), f"{name}: token KL differs\n{report}"
        assert _temps(out) == [], f"{name}: temporary files left: {_temps(out)}\n{report}"
        assert (out / "report.html").exists() and (out / "policy" / "config.json").exists()


_SAVE_TWICE = """
import sys, torch
from klbelt.rl.io import atomic_torch_save
atomic_torch_save({"step": 1, "w": torch.arange(100000.0)}, sys.argv[1])
atomic_torch_save({"step": 2, "w": torch.zeros(100000)}, sys.argv[1])
"""


@pytest.mark.parametrize("point", ["mid-write", "after-fsync", "after-rename"])
def test_a_kill_inside_a_checkpoint_write_leaves_a_whole_checkpoint(tmp_path, point):
    import torch

    from klbelt.rl.io import remove_stale_temps

    path = tmp_path / "checkpoint.pt"
    env = {**ENV, "KLBELT_FAULT": f"atomic-write:checkpoint.pt:{point}:2"}
    proc = subprocess.run([sys.executable, "-c", _SAVE_TWICE, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(path, weights_only=True)
    assert state["step"] == (2 if point == "after-rename" else 1)
    assert torch.equal(state["w"], torch.zeros(100000) if point == "after-rename" else torch.arange(100000.0))
    temps = _temps(tmp_path)
    if point == "after-rename":
        assert temps == []
    else:  # the killed writer's temporary file: removed as stale, its PID being dead
        assert len(temps) == 1 and temps[0].startswith(".checkpoint.pt.tmp-"), temps
    assert [p.name for p in remove_stale_temps(tmp_path)] == temps
    assert _temps(tmp_path) == []


def test_remove_stale_temps_keeps_temps_of_live_processes(tmp_path):
    from klbelt.rl.io import remove_stale_temps

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
        for name in (f".checkpoint.pt.tmp-{child.pid}", f".checkpoint.pt.tmp-{dead}", f".config.json.tmp-{os.getpid()}",
                     "notes.tmp-1", "checkpoint.pt"):
            (tmp_path / name).write_text("x")
        removed = sorted(p.name for p in remove_stale_temps(tmp_path))
        assert removed == sorted([f".checkpoint.pt.tmp-{dead}", f".config.json.tmp-{os.getpid()}"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".checkpoint.pt.tmp-{child.pid}", "notes.tmp-1", "checkpoint.pt"])
    finally:
        child.kill()
        child.wait()


def test_a_torn_last_metrics_line_is_dropped_on_read_and_trimmed_on_resume(tmp_path):
    from klbelt.rl.io import JsonlLog, read_jsonl

    log = JsonlLog(tmp_path / "metrics.jsonl")
    for step in range(5):
        log.append({"step": step, "kl": 0.1 * step})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "kl": 0.')  # a kill mid-append
    with pytest.warns(RuntimeWarning, match="last line is incomplete"):
        assert [r["step"] for r in read_jsonl(log.path)] == [0, 1, 2, 3, 4]
    with pytest.warns(RuntimeWarning):
        log.keep_steps_before(3)
    assert log.path.read_text() == "".join(json.dumps({"step": s, "kl": 0.1 * s}) + "\n" for s in range(3))
    log.path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(log.path)


# --- read-only output directory, full disk -------------------------------------------------------------


@lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...] | None:
    """A command prefix that runs a shell in a private mount namespace, or None."""
    import shutil

    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return None
    for prefix in (("unshare", "-m"), ("unshare", "-rm")):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def _in_namespace(setup: str) -> tuple:
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("needs a private mount namespace to make a real read-only directory / small disk "
                    "(`unshare -m` as root, or `unshare -rm` with unprivileged user namespaces); neither works here")
    return (*prefix, "sh", "-c", f"{setup} && exec \"$0\" \"$@\"")


def _mount_read_only(directory: Path) -> str:
    d = shlex.quote(str(directory))
    return f"mount --bind {d} {d} && mount -o remount,bind,ro {d} {d}"


def _mount_tmpfs(directory: Path, size: str) -> str:
    return f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(directory))}"


def _one_clear_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("klbelt train: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["out is the read-only directory", "out is new, inside it"])
def test_a_read_only_output_directory_fails_before_training(tmp_path, model_dir, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if where.startswith("out is the") else ro / "run"
    cfg = _config(tmp_path, model_dir, out)
    proc = _klbelt("train", "--config", cfg, prefix=_in_namespace(_mount_read_only(ro)))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    _one_clear_line(err, f"output directory {out}", "Read-only file system")
    assert sorted(p.name for p in ro.iterdir()) == []  # no metrics, config or probe file


def test_a_full_disk_fails_before_training(tmp_path, model_dir):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    proc = _klbelt("train", "--config", _config(tmp_path, model_dir, out), prefix=_in_namespace(_mount_tmpfs(disk, "2m")))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    _one_clear_line(err, f"output directory {out}", "MiB free, need at least")


_FILL_AT_STEP = 4


def fill_disk_then_score(texts):
    """A reward (test_cli_train's) that, on its 5th call (step 4, after the checkpoint of step 3),
    fills the disk of $KLBELT_TEST_FILL but for 24 KiB: room for metrics lines, none for a checkpoint."""
    from test_cli_train import score_good

    fill_disk_then_score.calls = getattr(fill_disk_then_score, "calls", 0) + 1
    if fill_disk_then_score.calls == _FILL_AT_STEP + 1:
        target = Path(os.environ["KLBELT_TEST_FILL"])
        st = os.statvfs(target)
        with open(target / "filler", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (24 << 10)))
    return score_good(texts)


_MID_RUN = """
import json, shutil, sys
from klbelt.cli.train import load_policy, load_prompts
from klbelt.rl.config import TrainConfig
from klbelt.rl.trainer import train
import test_faults
cfg = TrainConfig.from_file(sys.argv[1])
model, tok = load_policy(cfg.model)
try:
    train(cfg, model, tok, load_prompts(cfg.prompts, tok), test_faults.fill_disk_then_score, warn_alerts=False)
    result = {"raised": None}
except Exception as exc:
    result = {"raised": type(exc).__name__, "is_oserror": isinstance(exc, OSError), "message": str(exc)}
import os
os.unlink(os.path.join(os.environ["KLBELT_TEST_FILL"], "filler"))
shutil.copytree(cfg.out, sys.argv[2])
print("RESULT " + json.dumps(result))
"""


def test_a_disk_filling_mid_run_gives_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, model_dir):
    import torch

    disk = tmp_path / "disk"
    disk.mkdir()
    # 80 MiB passes check_writable's 64 MiB; the reward fills it after the first checkpoint
    cfg = _config(tmp_path, model_dir, disk / "run", reward="test_faults:fill_disk_then_score")
    copy = tmp_path / "copy"
    cmd = [*_in_namespace(_mount_tmpfs(disk, "80m")), sys.executable, "-c", _MID_RUN, str(cfg), str(copy)]
    proc = subprocess.run(cmd, env={**ENV, "KLBELT_TEST_FILL": str(disk)}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["is_oserror"], result
    assert result["message"].startswith(f"cannot write {disk / 'run' / 'checkpoint.pt'}: No space left on device"), result
    assert _temps(copy) == []
    state = torch.load(copy / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3  # the checkpoint before the disk filled, whole
    assert [r["step"] for r in _rows(copy / "metrics.jsonl")] == list(range(6))
