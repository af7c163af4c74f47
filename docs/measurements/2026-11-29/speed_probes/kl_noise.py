"""How much of the demo's update-to-update KL change the previous KL and beta explain: least squares
of KL[t+1] - KL[t] on (1, KL[t], beta[t-lag]) over the run folders given, t >= 3.

python kl_noise.py RUN_DIR [RUN_DIR ...]
"""
import json
import sys

import numpy as np

runs = []
for folder in sys.argv[1:]:
    rows = [json.loads(line) for line in open(f"{folder}/metrics.jsonl")]
    runs.append((np.array([r["kl"] for r in rows]), np.array([r["kl_coef"] for r in rows])))
for lag in range(5):
    x, y = [], []
    for kl, beta in runs:
        for t in range(max(lag, 3), len(kl) - 1):
            x.append([1.0, kl[t], beta[t - lag]])
            y.append(kl[t + 1] - kl[t])
    x, y = np.array(x), np.array(y)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    resid = y - x @ coef
    print(f"lag {lag}: coef {coef.round(4)}, residual std {resid.std():.4f}, R2 {1 - resid.var() / y.var():.3f}")
