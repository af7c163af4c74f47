"""Tried and not kept: scoring a group's shared prompt once. The demo's 4 prompts x 4 samples, random 24-token
responses; the reference forward (no grad) and PPO's forward+backward, each either as one pass over prompt +
response, or as the 4 distinct prompts once (KV cache) expanded to their 16 rows and the responses on top.
SmolLM2 with the demo's LoRA, bf16 base and attention, 2 threads; medians of 4, the two taken in turn twice.

python prefix_sharing.py
"""
import torch
from _common import lora_batch, median_seconds

from klbelt.kl import logprobs_from_logits
from klbelt.rl.attention import set_attention
from klbelt.rl.lora import adapters_disabled, autocast, hold_base_in_bf16
from klbelt.rl.rollout import last_positions, position_ids

policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
hold_base_in_bf16(policy)
set_attention(policy, cfg.attn_implementation)
B, P, R = ids.shape[0], ids.shape[1], cfg.max_new_tokens
resp = torch.randint(100, 20000, (B, R), generator=torch.Generator().manual_seed(0))
seq, full = torch.cat([ids, resp], 1), torch.cat([mask, mask.new_ones(B, R)], 1)
pos = position_ids(full)


def one_pass(model):
    return model(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=last_positions(R + 1, P + R, None)).logits[:, :-1]


def shared_prompt(model):
    unique, rows = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    u_ids, u_mask = unique[:, :P], unique[:, P:]
    first = model(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids(u_mask), use_cache=True,
                  logits_to_keep=last_positions(1, P, None))
    cache = first.past_key_values
    cache.batch_select_indices(rows)  # the prompt's keys and values, one copy per sample
    rest = model(input_ids=resp[:, :-1], attention_mask=full[:, :-1], position_ids=pos[:, P:-1], past_key_values=cache, use_cache=True)
    return torch.cat([first.logits[rows], rest.logits], 1)


for name, logits in [("one pass", one_pass), ("shared prompt", shared_prompt)] * 2:
    def reference():
        with torch.no_grad(), adapters_disabled(policy) as base, autocast("cpu", True):
            return logits(base)

    def forward_backward():
        with autocast("cpu", True):
            out = logits(policy)
        logprobs_from_logits(out, resp).mean().backward()

    print(f"{name:14s} reference forward {median_seconds(reference):.3f} s   forward+backward {median_seconds(forward_backward):.3f} s", flush=True)
