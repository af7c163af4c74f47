"""Per update of a demo run: the k1 and k3 means of the per-token log-ratios and their standard errors (over sequences)."""
import json, sys, math, statistics as st
for folder in sys.argv[1:]:
    rel1, rel3 = [], []
    for line in open(f"{folder}/token_kl.jsonl"):
        r = json.loads(line)
        seq1, seq3 = [], []
        for resp in r["responses"]:
            lr = resp["kl"]
            seq1.append(sum(lr) / len(lr)); seq3.append(sum(math.exp(-x) - 1 + x for x in lr) / len(lr))
        n = len(seq1)
        m1, m3 = st.fmean(seq1), st.fmean(seq3)
        se1, se3 = st.stdev(seq1) / math.sqrt(n), st.stdev(seq3) / math.sqrt(n)
        if m3 > 0.01:
            rel1.append(se1 / m3); rel3.append(se3 / m3)
        print(f"{folder} step {r['step']:>2} n {n} k1 {m1:.4f} se {se1:.4f}   k3 {m3:.4f} se {se3:.4f}")
    if rel1:
        print(f"{folder}: median relative SE (updates with k3 > 0.01): k1 {st.median(rel1):.2f}  k3 {st.median(rel3):.2f}")
