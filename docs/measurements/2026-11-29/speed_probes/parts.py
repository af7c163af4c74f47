import copy
import torch
from _common import lora_batch, median_seconds
from klbelt.rl.lora import adapters_disabled
from klbelt.rl.rollout import sample
policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
roll = sample(policy, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
seq, full = roll.sequences, roll.attention_mask
pos = (full.cumsum(-1)-1).clamp_min(0)
def med(fn, n=4):
    return 1000 * median_seconds(fn, n)
@torch.no_grad()
def ref32():
    with adapters_disabled(policy) as ref: ref(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=25)
@torch.no_grad()
def refbf():
    with adapters_disabled(policy) as ref, torch.autocast("cpu", dtype=torch.bfloat16): ref(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=25)
base_bf = copy.deepcopy(policy.get_base_model()) 
def fb():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lg = policy(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=25).logits
    lg.float().log_softmax(-1).mean().backward()
print("ref fp32", med(ref32)); print("ref bf16 autocast", med(refbf)); print("policy fb autocast", med(fb))
# bf16 base weights
for n, p in policy.named_parameters():
    if "lora_" not in n: p.data = p.data.bfloat16()
print("ref bf16 weights+autocast", med(refbf)); print("policy fb bf16 base", med(fb))
