"""torch.profiler over the demo's passes on the final code: the copy's decode loop (LeanDecoder), the reference
forward, PPO's forward+backward. SmolLM2 with the demo's LoRA (adapters moved off zero) and bf16 base,
klbelt_fp32 attention, 16 x (prompt + 24) tokens, 2 threads.

python profile_passes.py

Per pass: its wall time (median of 3 after a warm-up), the self CPU time of the matrix products
(oneDNN linear, mm, bmm) and of everything else, and the matrix products' GFLOP/s for the trained passes
(2 x rows x weights, each linear layer and the LM head counted once per product).
"""
import statistics
import time

import torch
from _common import lora_batch
from torch.profiler import ProfilerActivity, profile

from klbelt.kl import logprobs_from_logits
from klbelt.rl.attention import set_attention
from klbelt.rl.lora import adapters_disabled, autocast, hold_base_in_bf16
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import last_positions, position_ids, sample

policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
hold_base_in_bf16(policy)
set_attention(policy, cfg.attn_implementation)
B, P, R = ids.shape[0], ids.shape[1], cfg.max_new_tokens
sampler = MergedCopySampler()
sampler.refresh(policy)
sampler.decoder.reserve(R)
roll = sample(sampler.decoder, ids, mask, max_new_tokens=R, generator=torch.Generator().manual_seed(0), stop_on_eos=False)
seq, full = roll.sequences, roll.attention_mask
pos, keep, resp = position_ids(full), last_positions(R + 1, P + R, None), roll.responses


def decode():
    sample(sampler.decoder, ids, mask, max_new_tokens=R, generator=torch.Generator().manual_seed(0), stop_on_eos=False)


def reference():
    with torch.no_grad(), adapters_disabled(policy) as base, autocast("cpu", True):
        base(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=keep)


def forward_backward():
    with autocast("cpu", True):
        logits = policy(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=keep).logits[:, :-1]
    logprobs_from_logits(logits, resp).mean().backward()


model = policy.get_base_model()
body = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n and n != "lm_head")
head = model.lm_head.weight.numel()
flop = {"reference": 2 * (B * (P + R) * body + B * (R + 1) * head)}
flop["forward_backward"] = 2 * flop["reference"]  # the backward's input gradients: one more product per weight
MATMUL = ("mkldnn::_linear_pointwise", "aten::mm", "aten::bmm", "aten::addmm")
for name, fn in [("decode", decode), ("reference", reference), ("forward_backward", forward_backward)]:
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    mat = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6
    rest = sum(e.self_cpu_time_total for e in events if e.key not in MATMUL) / 1e6
    line = f"{name:17s} wall {statistics.median(times):.3f} s   matrix products {mat:.3f} s   other ops {rest:.3f} s"
    if name in flop:
        line += f"   {flop[name] / 1e9:.0f} GFLOP at {flop[name] / 1e9 / mat:.0f} GFLOP/s"
    print(line, flush=True)
