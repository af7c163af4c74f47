"""Run the `klbelt bench fused` grid cell by cell under a time budget; merge into /work/runs/s2/fused.{json,txt}."""
import json, os, subprocess, sys, time, datetime
import torch
BUDGET_S = float(sys.argv[1]) if len(sys.argv) > 1 else 22 * 60
t0 = time.time()
torch.set_num_threads(2)
h = torch.randn(4096, 576); w = torch.randn(49152, 576)
h @ w.T
s = time.perf_counter(); h @ w.T; dt = time.perf_counter() - s
rate = 2 * 4096 * 576 * 49152 / dt  # flop/s
del h, w
print(f"measured fp32 matmul rate {rate / 1e9:.1f} GFLOP/s (4096x576 @ 576x49152, 2 threads)", flush=True)
COMMON = ["--rows", "4096", "--big-gflop", "300", "--repeats", "3", "--big-repeats", "1", "--json"]
cells = []
for function in ("logprobs",):
    for hs, v in ((576, 49152), (576, 151936), (2048, 49152), (2048, 151936)):
        for dt_ in ("float32", "bfloat16"):
            cells.append((function, hs, v, dt_))
cells += [("kl", 576, 49152, "float32"), ("kl", 576, 49152, "bfloat16")]
def estimate(function, hs, v, dtype, impls=3):
    gf = 2 * 4096 * hs * v
    big = gf / 1e9 >= 300
    calls = (1 / 8 + 1) if big else (1 + 3)
    mm_fwd = 3 if impls == 3 else 2
    mm_fb = 10 if impls == 3 else 7
    per = (mm_fwd + mm_fb) * (2 if function == "kl" else 1)
    return 1.3 * per * calls * gf / rate  # +30% for kernels, process start, memory
total = sum(estimate(*c) for c in cells)
print(f"estimated full grid: {total / 60:.1f} min; budget {BUDGET_S / 60:.1f} min", flush=True)
rows, notes = [], []
for cell in cells:
    function, hs, v, dtype = cell
    elapsed = time.time() - t0
    impls = "naive,unfused,fused"
    est = estimate(*cell)
    mem_avail = int([l for l in open("/proc/meminfo") if l.startswith("MemAvailable")][0].split()[1]) / 2**20
    need_naive_gb = 4 * 4096 * v * 4 / 2**30 + 1
    if elapsed + est > BUDGET_S or mem_avail < need_naive_gb:
        est2 = estimate(*cell, impls=2)
        if elapsed + est2 <= BUDGET_S:
            impls, est = "unfused,fused", est2
            notes.append(f"{cell}: naive skipped (estimate {estimate(*cell)/60:.1f} min, {BUDGET_S - elapsed:.0f} s left, {mem_avail:.1f} GB available)")
        else:
            notes.append(f"{cell}: not run (estimate {est2 / 60:.1f} min, {BUDGET_S - elapsed:.0f} s left)")
            print(notes[-1], flush=True)
            continue
    cmd = [sys.executable, "-m", "klbelt", "bench", "fused", "--functions", function, "--hidden", str(hs), "--vocab", str(v),
           "--dtypes", dtype, "--impls", impls, *COMMON]
    print(f"[{elapsed / 60:.1f} min] {' '.join(cmd[1:])}  (estimate {est / 60:.1f} min)", flush=True)
    s = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stderr); sys.stdout.flush()
    if proc.returncode:
        notes.append(f"{cell}: failed (exit {proc.returncode})")
        continue
    got = json.loads(proc.stdout)
    for r in got:
        r["cell_wall_s"] = round(time.time() - s, 1)
    rows += got
    json.dump(rows, open("/tmp/h15_grid/partial.json", "w"), indent=1)
print("\n".join(notes), flush=True)
os.makedirs("/work/runs/s2", exist_ok=True)
tmp = "/work/runs/s2/fused.json.tmp"
json.dump(rows, open(tmp, "w"), indent=1); os.replace(tmp, "/work/runs/s2/fused.json")
print(f"grid done in {(time.time() - t0) / 60:.1f} min", flush=True)
