"""``klbelt`` command line: a thin dispatcher over subcommand modules.

Each subcommand module exposes ``add_parser(subparsers)``, which registers its
parser and sets ``func`` (taking the parsed args, returning an exit code).
Modules are imported only when needed so ``klbelt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under klbelt.cli
SUBCOMMANDS = {
    "demo": "demo",
    "sweep": "sweep",
    "train": "train",
    "pretrain": "pretrain",
    "bench": "bench",
    "report": "report",
    "doctor": "doctor",
    "sim": "sim",
    "plot": "plot",
}
# Each module registers itself with one line above; keep the help output cheap.


def build_parser(names=None) -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="klbelt",
        description="klbelt: the KL safety belt for RLHF (estimators, shaping, controllers, monitoring).",
    )
    parser.add_argument("--version", action="version", version=f"klbelt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if names is None or name in names:
            importlib.import_module(f"klbelt.cli.{module}").add_parser(sub)
        else:
            sub.add_parser(name, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or None
    parser = build_parser(None if wanted is None else wanted)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        # bad input: one line naming what is wrong, no traceback (DESIGN.md)
        print(f"klbelt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a file could not be written mid-run (full disk, ...): one line; what was saved is intact
        print(f"klbelt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"klbelt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
