"""``klbelt bench NAME``: benchmarks that print ratios against named baselines.

Each benchmark is a module ``klbelt.bench.NAME`` with ``DESCRIPTION`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. Keep heavy imports
inside ``run`` so building the parser stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util

BENCHMARKS = ("kernels", "monitor", "trainer", "scaling", "fused")


DESCRIPTION = ("Benchmarks that print klbelt's time and memory as ratios against named baselines. "
               "Run klbelt bench NAME --help for a benchmark's options.")


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="run a benchmark: " + ", ".join(_available()), description=DESCRIPTION)
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in _available():
        module = importlib.import_module(f"klbelt.bench.{name}")
        p = names.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def _available():
    return [n for n in BENCHMARKS if importlib.util.find_spec(f"klbelt.bench.{n}") is not None]
