"""The beta table of docs/english-demo.md from a `klbelt sweep` folder: one row per run, from its summary.json.

python docs/measurements/2026-11-29/sweep_table.py runs/sweep
"""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep")
rows = json.loads((out / "sweep.json").read_text())
print('| beta | seed | proxy start -> end | gold start -> end (best) | KL nats/token | KL nats/seq | distinct-2 | ref NLL nats/token | "!" per 100 chars | verdict |')
print("|---|---|---|---|---|---|---|---|---|---|")
for row in rows:
    s = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
    a, b = s["start"], s["end"]
    kl = b["kl"]
    print(f"| {row['beta']:g} | {row['seed']} | {a['reward']:+.2f} -> {b['reward']:+.2f} | "
          f"{a['gold_reward']:+.2f} -> {b['gold_reward']:+.2f} ({s['best_gold_reward']:+.2f}) | "
          f"{kl:.3g} | {b['kl_seq']:.3g} | {a['distinct_2']:.3f} -> {b['distinct_2']:.3f} | {a['ref_nll']:.2f} -> {b['ref_nll']:.2f} | "
          f"{b['exclaim_rate']:.2f} | {s['verdict'].split(':')[0]} |")
