"""Where does the fused forward lose time? N=4096, H=576, V=49152 fp32, 2 threads."""
import os
import time, statistics, torch
torch.set_num_threads(int(os.environ.get("H15_T", 2)))
from klbelt.kl import logprobs_from_hidden, logprobs_from_logits, _kernels
torch.manual_seed(0)
import os; n, H, V = int(os.environ.get("H15_N", 4096)), 576, 49152
h = torch.randn(n, H) * 0.5; w = torch.randn(V, H) / H**0.5; t = torch.randint(0, V, (n,))
def tm(f, k=2):
    f(); ts = []
    for _ in range(k):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e3
def rep(name, ms, flops=None):
    extra = f"  {flops / ms / 1e6:.1f} GFLOP/s" if flops else ""
    print(f"{name:44s} {ms:9.1f} ms{extra}", flush=True)
F = 2 * n * H * V
rep("matmul full [4096,576]x[576,49152]", tm(lambda: h @ w.T), F)
z = h @ w.T
rep("kernel logprobs_from_logits on full logits", tm(lambda: logprobs_from_logits(z, t)))
for c in (86, 205, 512):  # 86: the old default block; 205: the new default here
    rep(f"matmul in {c}-row blocks", tm(lambda: [torch.mm(h[s:s+c], w.t()) for s in range(0, n, c)]), F)
    buf = torch.empty(c, V)
    rep(f"matmul in {c}-row blocks, one reused out= buffer", tm(lambda: [torch.mm(h[s:s+c], w.t(), out=buf[:min(c, n - s)]) for s in range(0, n, c)]), F)
    rep(f"kernel in {c}-row blocks", tm(lambda: [_kernels.run('logprob_fwd_one_pass', n * V, z[s:s+c], t[s:s+c], 1.0) for s in range(0, n, c)]))
    rep(f"fused, chunk_size={c}", tm(lambda: logprobs_from_hidden(h, w, t, chunk_size=c)))
del z
gw = torch.zeros(V, H); gz = torch.randn(205, V)
rep("grad_W addmm_ K=205 blocks (20x)", tm(lambda: [gw.addmm_(gz.t(), h[:205]) for _ in range(20)], 1), F)
gz4 = torch.randn(n, V)
rep("grad_W mm K=4096 (unfused)", tm(lambda: gz4.t() @ h, 1), F)
del gz4, gw, gz
hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
def fb(fn):
    out = fn(); torch.autograd.grad(out.sum(), [hr, wr])
rep("unfused fwd+bwd", tm(lambda: fb(lambda: logprobs_from_logits(hr @ wr.T, t)), 1))
rep("fused fwd+bwd default chunk", tm(lambda: fb(lambda: logprobs_from_hidden(hr, wr, t)), 1))
