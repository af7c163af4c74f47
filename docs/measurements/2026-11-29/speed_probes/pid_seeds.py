"""One English demo run with given PID gains and seed (no samples printed); prints the second-half KL.

python docs/measurements/2026-11-29/speed_probes/pid_seeds.py KP,KI,KD SEED OUT_DIR [LR]
"""
import sys, json, statistics
from dataclasses import replace
from klbelt.demo.task import ENGLISH_DEMO_CONFIG, run_demo
gains=[float(x) for x in sys.argv[1].split(",")]; seed=int(sys.argv[2]); out=sys.argv[3]
lr=float(sys.argv[4]) if len(sys.argv)>4 else ENGLISH_DEMO_CONFIG.lr
cfg=replace(ENGLISH_DEMO_CONFIG, pid_gains=gains, seed=seed, out=out, lr=lr)
run_demo(cfg, show=False) if 'show' in run_demo.__code__.co_varnames else run_demo(cfg)
m=[json.loads(l) for l in open(out+'/metrics.jsonl')]
kl=[r['kl'] for r in m]
print("RESULT", gains, seed, lr, "2nd half KL %.4f"%statistics.mean(kl[18:]), "proxy %.2f->%.2f gold %.2f->%.2f"%(statistics.mean(r['reward'] for r in m[:6]),statistics.mean(r['reward'] for r in m[-6:]),statistics.mean(r['gold_reward'] for r in m[:6]),statistics.mean(r['gold_reward'] for r in m[-6:])), flush=True)
