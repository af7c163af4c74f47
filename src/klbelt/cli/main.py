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
    "bon": "bon",
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


def unknown_message(parser, command, unknown) -> str:
    """One line for arguments no parser took: the first unknown flag and the closest valid one."""
    import difflib

    target = parser
    if command is not None:
        for action in parser._actions:  # the subcommand's own parser holds its flags
            if isinstance(action, argparse._SubParsersAction):
                target = action.choices[command]
    flags = [s for a in target._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    first = next((u for u in unknown if u.startswith("-")), unknown[0])
    name = first.split("=", 1)[0]
    where = f"klbelt {command}" if command else "klbelt"
    if not name.startswith("-"):
        return f"{where}: unexpected argument {first!r}"
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; see {where} --help"
    return f"unknown flag {name} for {where}{hint}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or None
    parser = build_parser(None if wanted is None else wanted)
    usage_code = wanted and getattr(importlib.import_module(f"klbelt.cli.{SUBCOMMANDS[wanted[0]]}"), "USAGE_EXIT_CODE", None)
    if usage_code:  # a subcommand whose exit codes are verdicts (doctor) reports usage errors with its own code
        def usage_error(message):
            parser.print_usage(sys.stderr)
            parser.exit(usage_code, f"{parser.prog}: error: {message}\n")

        parser.error = usage_error
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # one line, with the closest valid flag
        print(f"klbelt: error: {unknown_message(parser, args.command, unknown)}", file=sys.stderr)
        return usage_code or 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        # bad input: one line naming what is wrong, no traceback (docs/design.md)
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
