"""The demo criteria of finished runs: mean KL over the second half of the updates, and proxy / gold reward as
means of the first and last 6 updates; then the second half's KL and beta ranges and the sampler mismatch
(mismatch_k3 range, its share of the KL, the largest single-token log-ratio) where the run has them.

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
    late = m[half:]
    line = (f"    updates {half}-{len(m) - 1}: KL {min(r['kl'] for r in late):.3f}-{max(r['kl'] for r in late):.3f}, "
            f"beta {min(r['kl_coef'] for r in late):.2f}-{max(r['kl_coef'] for r in late):.2f}")
    seen = [r for r in m if r.get("mismatch_k3") is not None]
    if seen:
        share = sorted(r["mismatch_k3"] / r["kl"] for r in seen if r["kl"] > 0)
        line += (f"; mismatch_k3 {min(r['mismatch_k3'] for r in seen):.4f}-{max(r['mismatch_k3'] for r in seen):.4f} nats/token, "
                 f"of the KL: median {statistics.median(share):.0%}, 10th-90th percentile {share[len(share) // 10]:.0%}-"
                 f"{share[9 * len(share) // 10]:.0%}; largest |log pi/mu| of a token {max(r['mismatch_max_logratio'] for r in seen):.2f}")
    print(line)
