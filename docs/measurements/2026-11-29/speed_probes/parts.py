import time, torch, statistics, copy
torch.set_num_threads(2)
from klbelt.bench.work import english_work
from klbelt.rl.lora import apply_lora, adapters_disabled
from klbelt.rl.rollout import sample
from klbelt.kl import logprobs_from_logits
spec = {"model": "smollm2", "bf16": True, "warmup": 1, "updates": 1}
model, tok, prompts, cfg = english_work(spec)
policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
with torch.no_grad():
    for n, p in policy.named_parameters():
        if "lora_B" in n: p.normal_(0, 0.01)
batch = [p for p in prompts[:4] for _ in range(4)]
enc = tok(batch, return_tensors="pt", padding=True)
ids, mask = enc["input_ids"], enc["attention_mask"]
roll = sample(policy, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
seq, full = roll.sequences, roll.attention_mask
pos = (full.cumsum(-1)-1).clamp_min(0)
def med(fn, n=4):
    ts=[]
    for i in range(n+1):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return 1000*statistics.median(ts[1:])
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
