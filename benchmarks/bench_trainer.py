"""Whole PPO updates per second: klbelt's trainer vs TRL 1.0.0's PPOTrainer and the floor.

The same benchmark as ``klbelt bench trainer`` (see ``klbelt.bench.trainer``
for what is measured and how), as a script:

    python benchmarks/bench_trainer.py            # settings A and B, a table
    python benchmarks/bench_trainer.py --json     # one JSON object per setting
"""

from __future__ import annotations

import argparse
import sys

from klbelt.bench import trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=trainer.DESCRIPTION)
    trainer.add_arguments(parser)
    return trainer.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
