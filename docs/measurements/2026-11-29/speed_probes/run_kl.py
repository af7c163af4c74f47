"""The demo criteria of finished runs: mean KL over the second half of the updates, and proxy / gold reward as
means of the first and last 6 updates.

python run_kl.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys

for run in sys.argv[1:]:
    m = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    half = len(m) // 2
    first, last = m[:6], m[-6:]
    mean = statistics.mean
    print(f"{run}: {len(m)} updates, KL 2nd half {mean(r['kl'] for r in m[half:]):.4f} nats/token, "
          f"proxy {mean(r['reward'] for r in first):+.2f} -> {mean(r['reward'] for r in last):+.2f}, "
          f"gold {mean(r['gold_reward'] for r in first):+.2f} -> {mean(r['gold_reward'] for r in last):+.2f}")
