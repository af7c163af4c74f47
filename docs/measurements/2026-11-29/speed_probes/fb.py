import time, torch, statistics, resource
torch.set_num_threads(2)
from _common import lora_batch
from klbelt.rl.rollout import sample, response_logprobs, set_fused_head
import sys
policy, tok, cfg, ids, mask = lora_batch()
roll = sample(policy, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
mode = sys.argv[1]
set_fused_head(mode != "full")
def fb():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = response_logprobs(policy, roll, with_entropy=(mode != "noent")); lp = lp[0] if isinstance(lp, tuple) else lp
    (-(lp*roll.response_mask).mean()).backward()
    policy.zero_grad(set_to_none=True)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024
ts=[]
for i in range(4):
    t=time.perf_counter(); fb(); ts.append(time.perf_counter()-t)
print(mode, "fb ms", 1000*statistics.median(ts[1:]), "rss before", r0, "after", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)
