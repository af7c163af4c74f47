"""Backward breakdown at N=4096, H=576, V=49152 fp32, 2 threads: torch.profiler op totals of one fwd+bwd."""
import torch
torch.set_num_threads(2)
from klbelt.kl import logprobs_from_hidden, logprobs_from_logits
torch.manual_seed(0)
n, H, V = 4096, 576, 49152
hr = (torch.randn(n, H) * 0.5).requires_grad_(); wr = (torch.randn(V, H) / H**0.5).requires_grad_(); t = torch.randint(0, V, (n,))
def fb(fn):
    out = fn(); torch.autograd.grad(out.sum(), [hr, wr])
for name, f in (("fused", lambda: logprobs_from_hidden(hr, wr, t)), ("unfused", lambda: logprobs_from_logits(hr @ wr.T, t))):
    fb(f)
    with torch.profiler.profile() as prof:
        fb(f)
    print("==", name)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
