"""Does the attention implementation move the bf16-merged sampler's mismatch? The demo run's final policy
(saved merged, so here it is the base with zero LoRA adapters, bf16 base, the demo's path), 16 held-out
prompts, 4 rollouts of 24 tokens each, klbelt_fp32 then sdpa.

python mismatch_attention.py RUN_DIR/policy

Prints per rollout the largest |log pi - log mu| of a sampled token and the k3 estimate of KL(mu || pi) per
token (nats), pi being the trainer's forward under bf16 autocast.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from klbelt.demo.english import english_prompts
from klbelt.rl.attention import set_attention
from klbelt.rl.lora import apply_lora, autocast, hold_base_in_bf16
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import response_logprobs

torch.set_num_threads(2)
directory = sys.argv[1]
tok = AutoTokenizer.from_pretrained(directory)
tok.padding_side = "left"
policy = apply_lora(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), 16, 32)
hold_base_in_bf16(policy)
enc = tok(english_prompts("eval")[:16], return_tensors="pt", padding=True)
for impl in ["klbelt_fp32", "sdpa"]:
    set_attention(policy, impl)
    sampler = MergedCopySampler()
    worst, k3 = [], []
    for seed in range(4):
        roll = sampler(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                       generator=torch.Generator().manual_seed(seed), eos_token_id=tok.eos_token_id)
        with torch.no_grad(), autocast("cpu", True):
            pi = response_logprobs(policy, roll)
        ratio = (pi - roll.logprobs) * roll.response_mask  # log pi/mu on the sampled tokens
        worst.append(ratio.abs().max().item())
        k3.append(((ratio.exp() - 1 - ratio) * roll.response_mask).sum().item() / roll.response_mask.sum().item())
    print(f"{impl:12s} max |log pi - log mu| {[round(w, 3) for w in worst]}   k3 {[round(k, 4) for k in k3]}", flush=True)
