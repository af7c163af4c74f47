import torch
from _common import lora_batch, median_seconds
from klbelt.rl.rollout import sample
policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
print("prompt shape", ids.shape)
run = lambda fn: median_seconds(fn, n=3)
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
