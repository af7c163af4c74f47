import time, torch, statistics, sys
torch.set_num_threads(2)
from dataclasses import replace
from klbelt.bench.work import english_work
from klbelt.rl.lora import apply_lora
from klbelt.rl.rollout import sample, position_ids
spec = {"model": "smollm2", "bf16": True, "warmup": 1, "updates": 1}
model, tok, prompts, cfg = english_work(spec)
policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
# make adapters nonzero
with torch.no_grad():
    for n, p in policy.named_parameters():
        if "lora_B" in n: p.normal_(0, 0.01)
batch = [p for p in prompts[:4] for _ in range(4)]
enc = tok(batch, return_tensors="pt", padding=True)
ids, mask = enc["input_ids"], enc["attention_mask"]
print("prompt shape", ids.shape)
def run(fn, n=3):
    ts=[]
    for i in range(n+1):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts[1:])
g = lambda: torch.Generator().manual_seed(0)
def fp32(): return sample(policy, ids, mask, max_new_tokens=24, generator=g(), eos_token_id=tok.eos_token_id)
def bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16): return sample(policy, ids, mask, max_new_tokens=24, generator=g(), eos_token_id=tok.eos_token_id)
print("fp32 lora", run(fp32))
print("bf16 autocast lora", run(bf16))
import copy
merged = copy.deepcopy(policy).merge_and_unload()
def mfp32(): return sample(merged, ids, mask, max_new_tokens=24, generator=g(), eos_token_id=tok.eos_token_id)
print("fp32 merged", run(mfp32))
mb = copy.deepcopy(merged).to(torch.bfloat16)
def mbf16(): return sample(mb, ids, mask, max_new_tokens=24, generator=g(), eos_token_id=tok.eos_token_id)
print("bf16 weights merged", run(mbf16))
