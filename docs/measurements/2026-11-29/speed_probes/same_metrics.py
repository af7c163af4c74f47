"""Whether two runs logged the same metrics, update for update, every key but the clock (``seconds``).

python same_metrics.py RUN_DIR_A RUN_DIR_B
"""
import json
import sys


def rows(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(f"{run}/metrics.jsonl")]


a, b = rows(sys.argv[1]), rows(sys.argv[2])
differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
print(f"{len(a)} and {len(b)} updates; identical but the clock: {len(a) == len(b) and not differ}"
      + (f" (first differing update: {differ[0]})" if differ else ""))
