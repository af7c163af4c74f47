import time, torch, statistics, resource
torch.set_num_threads(2)
from klbelt.bench.work import english_work
from klbelt.rl.lora import apply_lora, adapters_disabled
from klbelt.rl.rollout import sample, response_logprobs, set_fused_head
import sys
spec = {"model": "smollm2", "bf16": True, "warmup": 1, "updates": 1}
model, tok, prompts, cfg = english_work(spec)
policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
batch = [p for p in prompts[:4] for _ in range(4)]
enc = tok(batch, return_tensors="pt", padding=True)
roll = sample(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, generator=torch.Generator().manual_seed(0))
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
