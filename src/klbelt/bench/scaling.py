"""``klbelt bench scaling``: weak scaling of ``klbelt train`` over data-parallel processes.

The same per-rank work on 1 and on N processes: the demo task (the built-in
tiny GPT-2, VADER reward, a critic, the PID controller), ``--batch-per-rank``
sequences of ``--response-tokens`` tokens per process per update (EOS blocked,
so every response is full length and the token count is exact), with one
torch thread per process (``OMP_NUM_THREADS=1``). N processes run under
``klbelt train --nproc N`` (torchrun, gloo): they pay for what data
parallelism adds, i.e. DDP's gradient all-reduce of the policy and the critic,
the global reductions of the losses, the whitening, the observed KL fed to
the controller, and the all-gathers of the metrics.

Timing: each measurement is a fresh ``klbelt train`` run of ``--warmup`` +
``--updates`` updates; the process counts alternate (1, N, 1, N, ...) over
``--runs`` rounds so that machine drift hits each alike. An update's time is
its ``seconds`` in metrics.jsonl (rank 0's wall clock from the start of the
update to its metrics, which come after the last collective of the update),
and the figure is the median over every timed update of every run.
tokens/s = global batch x response tokens / that median; the speedup is
tokens/s on N processes over tokens/s on 1 process (ideal: N).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

DESCRIPTION = "weak scaling of klbelt train: tokens/s on N data-parallel processes vs 1, same per-rank batch, 1 thread each"
TARGET = {2: 1.7}


def add_arguments(parser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="processes to compare with 1 (default 2)")
    parser.add_argument("--batch-per-rank", type=int, default=16, help="sequences per process per update")
    parser.add_argument("--response-tokens", type=int, default=32, help="tokens per response")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates at the start of each run")
    parser.add_argument("--updates", type=int, default=6, help="timed updates per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per process count (alternating)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_once(nproc: int, args, work: Path, index: int) -> list[float]:
    from ..demo.task import DEMO_CONFIG

    out = work / f"run{index}-n{nproc}"
    cfg = replace(
        DEMO_CONFIG, steps=args.warmup + args.updates, batch_size=args.batch_per_rank * nproc,
        max_new_tokens=args.response_tokens, checkpoint_every=10**6, samples_every=10**6, out=str(out),
    )
    config = work / f"config{index}.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "klbelt", "train", "--config", str(config), "--nproc", str(nproc)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench scaling: {' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records[args.warmup:]]


def run(args) -> int:
    if args.nproc < 2:
        raise ValueError(f"--nproc must be >= 2 (it is compared with 1 process), got {args.nproc}")
    for name in ("batch_per_rank", "response_tokens", "updates", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    counts = (1, args.nproc)
    times: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="klbelt-bench-scaling-") as tmp:
        for r in range(args.runs):
            order = counts if r % 2 == 0 else counts[::-1]
            for n in order:
                times[n] += _run_once(n, args, Path(tmp), len(times[1]) + len(times[args.nproc]))
                if not args.json:
                    print(f"  run {r + 1}/{args.runs}, {n} process(es): median {statistics.median(times[n]):.3f} s/update", file=sys.stderr)
    rows = []
    for n in counts:
        median = statistics.median(times[n])
        tokens = args.batch_per_rank * n * args.response_tokens
        rows.append({"nproc": n, "global_batch": args.batch_per_rank * n, "median_s_per_update": median,
                     "tokens_per_s": tokens / median, "updates_timed": len(times[n])})
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {"rows": rows, "speedup": speedup, "efficiency": speedup / args.nproc, "target": TARGET.get(args.nproc),
              "batch_per_rank": args.batch_per_rank, "response_tokens": args.response_tokens, "threads_per_process": 1}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"klbelt bench scaling: demo task, {args.batch_per_rank} x {args.response_tokens} tokens per process per update, "
          f"1 thread per process, median of {rows[0]['updates_timed']} timed updates per count")
    print(f"{'processes':>9} {'global batch':>12} {'s/update':>9} {'tokens/s':>9} {'speedup':>8}")
    for row in rows:
        print(f"{row['nproc']:>9} {row['global_batch']:>12} {row['median_s_per_update']:>9.3f} {row['tokens_per_s']:>9.0f} "
              f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:>7.2f}x")
    target = TARGET.get(args.nproc)
    verdict = "" if target is None else f" (target >= {target}x: {'met' if speedup >= target else 'NOT met'})"
    print(f"speedup {speedup:.2f}x, efficiency {speedup / args.nproc:.0%}{verdict}")
    return 0
