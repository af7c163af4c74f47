"""The demo's three passes with each attention implementation: SmolLM2 with the demo's LoRA and bf16 base,
16 x (prompt + 24) tokens, 2 threads. Medians of 4 calls (rollout: 3), implementations taken in turn twice.

python attention.py

Prints, per implementation: the reference forward (adapters off, no grad), PPO's forward+backward, one
rollout of the bf16-merged sampler (sync included); then each implementation's largest log-prob difference
from fp32 attention computed in float64 (same bf16 linears) over the same tokens.
"""
import torch
from _common import lora_batch, median_seconds

from klbelt.kl import logprobs_from_logits
from klbelt.rl.attention import set_attention
from klbelt.rl.lora import adapters_disabled, autocast, hold_base_in_bf16
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import last_positions, position_ids

policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
hold_base_in_bf16(policy)
B, P, R = ids.shape[0], ids.shape[1], cfg.max_new_tokens
resp = torch.randint(100, 20000, (B, R), generator=torch.Generator().manual_seed(0))
seq, full = torch.cat([ids, resp], 1), torch.cat([mask, mask.new_ones(B, R)], 1)
pos, keep = position_ids(full), last_positions(R + 1, P + R, None)


def logits(model):
    return model(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=keep).logits[:, :-1]


def ref():
    with torch.no_grad(), adapters_disabled(policy) as base, autocast("cpu", True):
        return logits(base)


def forward_backward():
    with autocast("cpu", True):
        out = logits(policy)
    logprobs_from_logits(out, resp).mean().backward()


impls = ["sdpa", "eager", "klbelt_fp32"]
for impl in impls * 2:
    set_attention(policy, impl)
    sampler = MergedCopySampler()

    def rollout():
        sampler.refresh(policy)
        return sampler(policy, ids, mask, max_new_tokens=R, generator=torch.Generator().manual_seed(0), eos_token_id=tok.eos_token_id, stop_on_eos=False)

    print(f"{impl:12s} reference forward {median_seconds(ref):.3f} s   forward+backward {median_seconds(forward_backward):.3f} s   "
          f"rollout {median_seconds(rollout, 3):.3f} s", flush=True)

# accuracy: float64 attention over the same bf16 linears is the yardstick
import klbelt.rl.attention as A  # noqa: E402

exact = A.fp32_attention


def f64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    out, probs = exact(module, query.double(), key.double(), value.double(), attention_mask, scaling, dropout, **kw)
    return out.to(query.dtype), probs


from transformers import AttentionInterface  # noqa: E402

AttentionInterface.register("f64_probe", f64_attention)
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

AttentionMaskInterface.register("f64_probe", eager_mask)
policy.get_base_model().set_attn_implementation("f64_probe")
assert policy.get_base_model().config._attn_implementation == "f64_probe"
with torch.no_grad(), autocast("cpu", True):
    truth = logprobs_from_logits(logits(policy), resp)
for impl in impls:
    set_attention(policy, impl)
    with torch.no_grad(), autocast("cpu", True):
        diff = (logprobs_from_logits(logits(policy), resp) - truth).abs()
    print(f"{impl:12s} |log-prob - f64 attention|: max {diff.max():.4f}, mean {diff.mean():.5f} nats")
