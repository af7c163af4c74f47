import time, torch, statistics, resource
torch.set_num_threads(2)
from _common import lora_batch
from klbelt.rl.lora import adapters_disabled
from klbelt.rl.rollout import sample, response_logprobs, set_fused_head
import sys
policy, tok, cfg, ids, mask = lora_batch()
set_fused_head(False)
roll = sample(policy, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
if sys.argv[1] == "bf16base":
    for n, p in policy.named_parameters():
        if "lora_" not in n: p.data = p.data.bfloat16()
def med(fn, n=4):
    ts=[]
    for i in range(n+1):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return round(1000*statistics.median(ts[1:]))
@torch.no_grad()
def ref():
    with adapters_disabled(policy) as r, torch.autocast("cpu", dtype=torch.bfloat16): return response_logprobs(r, roll)
def fb():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = response_logprobs(policy, roll, with_entropy=True)
    (-(lp*roll.response_mask).mean()).backward(); policy.zero_grad(set_to_none=True)
print(sys.argv[1], "ref ms", med(ref), "fb ms", med(fb), "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024)
