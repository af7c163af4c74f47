"""``klbelt sweep``: the article's beta table, measured on the demo task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import comma_floats


def _betas(text: str) -> list[float]:
    values = comma_floats(text)
    if not values or any(v < 0 or v != v or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"betas must be finite numbers >= 0, got {text!r}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="fixed-beta runs of the demo task: the article's beta table, measured")
    p.add_argument("--betas", type=_betas, default=[0.0, 0.01, 0.1, 1.0], help="comma-separated betas (default: 0,0.01,0.1,1.0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per beta (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="PPO updates per run (default: 24 for smollm2, the demo's 150 for tiny)")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a local Hugging Face causal-LM directory")
    p.add_argument("--out", default="runs/sweep", help="output directory (default: runs/sweep)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from ..demo.task import SWEEP_BATCH, SWEEP_STEPS, run_sweep, task_for
    from .progress import Progress

    betas = args.betas
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    task = task_for(args.model)
    base = replace(task.config, steps=args.steps or SWEEP_STEPS.get(task.name, task.config.steps),
                   batch_size=SWEEP_BATCH.get(task.name, task.config.batch_size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"klbelt sweep: {base.model}, betas {betas} x {args.seeds} seed(s), {base.steps} updates of "
          f"{base.batch_size} continuations each, fixed beta; one row per (beta, seed), start -> end")
    header = (f"{'beta':>6} {'seed':>4} {'proxy':>15} {'gold':>15} {'best gold':>9} {'KL/tok':>8} {'!/100ch':>8} "
              f"{'dist-2':>7}  verdict")

    def on_run(row):
        print(f"{row['beta']:>6g} {row['seed']:>4} {row['start_reward']:>+6.3f} -> {row['reward']:>+6.3f} "
              f"{row['start_gold_reward']:>+6.3f} -> {row['gold_reward']:>+6.3f} {row['best_gold_reward']:>+9.3f} "
              f"{row['kl']:>8.4f} {row['exclaim_rate']:>8.2f} {row['distinct_2']:>7.3f}  {row['verdict']}", flush=True)

    progress = {"bar": None}

    def on_step(record):
        if record["step"] == 0 or progress["bar"] is None:
            progress["bar"] = Progress(base.steps, label="  ")
        progress["bar"](record)

    print(header)
    rows = run_sweep(betas, args.seeds, str(out), base=base, on_run=on_run, on_step=on_step)
    from ..rl.io import atomic_write_text

    atomic_write_text(out / "sweep.json", json.dumps(rows, indent=2) + "\n")
    print(f"\nWrote {out / 'sweep.json'}")
    return 0
