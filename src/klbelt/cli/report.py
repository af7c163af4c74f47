"""``klbelt report PATH [--out report.html]``: a self-contained HTML report of any readable run."""

from __future__ import annotations

import sys
from pathlib import Path


def column_mapping(items) -> dict:
    """``["kl=train/kl_mean", ...]`` -> ``{"kl": "train/kl_mean"}`` (for CSV logs)."""
    mapping = {}
    for item in items or []:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise ValueError(f"--column must look like NAME=SOURCE (e.g. kl=train/kl_mean), got {item!r}")
        mapping[name] = column
    return mapping


def add_run_arguments(parser) -> None:
    parser.add_argument(
        "path",
        metavar="PATH",
        help="a run: klbelt metrics.jsonl, a trainer_state.json (or its output folder), "
        "a TensorBoard event folder, or a CSV",
    )
    parser.add_argument(
        "--column",
        action="append",
        metavar="NAME=COLUMN",
        help="for CSV logs: which column holds klbelt's metric NAME (repeatable), e.g. --column kl=train/kl",
    )


def load(args):
    """The run at ``args.path``, or None after printing one line to stderr."""
    from ..monitor.readers import RunReadError, read_run

    try:
        return read_run(args.path, column_mapping(args.column))
    except RunReadError as e:
        print(f"klbelt {args.command}: {e}", file=sys.stderr)
        return None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report (KL, beta, rewards, verdicts) of a run",
        description="Write a self-contained HTML report of a run: KL, beta, rewards and the health verdicts, "
        "readable offline in any browser.",
    )
    add_run_arguments(p)
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--title", default=None, help="page title (default: the run's path)")
    p.add_argument("--bon", default=None, help="bon.json from klbelt bon: add the over-optimisation frontier section")
    p.set_defaults(func=run)


def run(args) -> int:
    run_ = load(args)
    if run_ is None:
        return 1
    try:
        from ..monitor.report import write_report

        out = write_report(run_, args.out, title=args.title or f"klbelt report: {run_.path}", bon_file=getattr(args, "bon", None))
    except ImportError as e:
        print(f"klbelt report: needs matplotlib ({e}); pip install 'klbelt[plot]'", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"klbelt report: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {Path(out)} ({len(run_.records)} steps from {run_.path}, {run_.format})")
    return 0
