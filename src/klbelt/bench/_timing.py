"""How every trainer benchmark times: one measurement per fresh process, medians of whole updates.

A measurement is a *spec* (a JSON-able dict) naming the function that measures,
``spec["child"] = "module:function"``. :func:`measure` runs it in a fresh Python
process (``python -m klbelt.bench._timing SPEC``), with ``spec["threads"]`` torch and
OpenMP threads, and returns the dict the function returned. The function gets the
spec and returns JSON-able results; nothing else crosses the process boundary, so a
child may run under another interpreter (a venv holding another TRL) and may import
any benchmark module without that module importing this one back.

An update's time runs from the end of the update before it to its own end, so all
of it counts (rollout, scoring, optimisation, logging, a trainer's gc.collect()).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time

RESULT_MARK = "KLBELT_BENCH_RESULT "


class Stop(Exception):
    """Raised from a trainer's step callback once the timed updates are done."""


def intervals(ends: list[float], warmup: int, updates: int | None = None) -> list[float]:
    """Seconds of each timed update: from the end of the update before it to its own end.

    ``ends[i]`` is the end time of update ``i``; the first ``warmup`` updates are not timed
    (``warmup`` >= 1: the first timed update needs the end of the one before it).
    """
    timed = ends[warmup - 1 :] if updates is None else ends[warmup - 1 : warmup + updates]
    return [b - a for a, b in zip(timed, timed[1:])]


def pooled_median(runs: list[dict], key: str = "intervals") -> float | None:
    """Median over every timed update of every run (robust to another process taking the CPU a while)."""
    pooled = [x for run in runs for x in run[key]]
    return statistics.median(pooled) if pooled else None


def time_passes(passes: dict, repeats: int, warmup_rounds: int, sync=None) -> dict[str, float]:
    """Median seconds of each zero-argument call in ``passes``, timed in rounds over all of them.

    Rounds over all passes (not one pass after another) so that drift of the machine hits
    every pass alike; the first ``warmup_rounds`` rounds are not timed. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after each call, inside its time.
    """
    times: dict[str, list[float]] = {name: [] for name in passes}
    for round_ in range(warmup_rounds + repeats):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            if round_ >= warmup_rounds:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_mb() -> float:
    """The process's resident high-water mark in MB (ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: dict, python: str | None = None, extra_env: dict | None = None) -> dict:
    """Run ``spec["child"]`` on ``spec`` in a fresh process (``python``, default this one); its result."""
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **(extra_env or {}))
    proc = subprocess.run([python or sys.executable, "-m", "klbelt.bench._timing", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark process ({spec['child']}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def child_main(spec_json: str) -> int:
    """In the child: set the threads, run the named function, print its result after the mark."""
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    module, _, name = spec["child"].partition(":")
    result = getattr(importlib.import_module(module), name)(spec)
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1]))
