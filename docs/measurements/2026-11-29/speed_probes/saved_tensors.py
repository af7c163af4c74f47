"""MB of tensors autograd saves for the backward of PPO's forward (bf16 autocast, bf16 base, demo batch),
counted once per storage with ``saved_tensors_hooks``, and how much of that is the model's own weights."""
import torch

from _common import lora_batch
from klbelt.rl.lora import hold_base_in_bf16
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import response_logprobs

policy, tok, cfg, ids, mask = lora_batch()
hold_base_in_bf16(policy)
roll = MergedCopySampler()(policy, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
seen = {}


def keep(t):
    seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return t


with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
    response_logprobs(policy, roll, 1.0, with_entropy=True)
params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
total = sum(seen.values()) / 2**20
weights = sum(v for k, v in seen.items() if k in params) / 2**20
print(f"sequences {tuple(roll.sequences.shape)}: saved {total:.0f} MB, of which weights {weights:.0f} MB, activations {total - weights:.0f} MB")
