"""Same as ``klbelt bench kernels [args]``: fused log-prob / exact-KL kernels vs the usual ways.

Usage: ``python benchmarks/bench_kernels.py [--rows N] [--vocab V] [--dtypes fp32,bf16]
[--repeats R] [--json]``; see ``--help`` and ``klbelt.bench.kernels`` for what is measured.
"""

from __future__ import annotations

import sys

from klbelt.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "kernels", *sys.argv[1:]]))
