"""The bf16-merged copy's decode loop: Hugging Face's forward against klbelt's LeanDecoder, same copy, same tokens.

SmolLM2 with the demo's LoRA (adapters moved off zero) and bf16 base, klbelt_fp32 attention, the demo's 4 x 4
prompts, 24 tokens, 2 threads; medians of 5 loops (the weight sync not included), the two taken in turn twice.

python lean_decode.py
"""
import torch
from _common import lora_batch, median_seconds

from klbelt.rl.attention import set_attention
from klbelt.rl.lora import hold_base_in_bf16
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import sample

policy, tok, cfg, ids, mask = lora_batch(move_adapters=True)
hold_base_in_bf16(policy)
set_attention(policy, "klbelt_fp32")
samplers = {lean: MergedCopySampler(lean=lean) for lean in (False, True)}
rollouts = {}
for lean, sampler in list(samplers.items()) * 2:
    sampler.refresh(policy)
    model = sampler.decoder if lean else sampler.copy
    if lean:
        sampler.decoder.reserve(cfg.max_new_tokens)

    def loop():
        return sample(model, ids, mask, max_new_tokens=cfg.max_new_tokens, generator=torch.Generator().manual_seed(0),
                      eos_token_id=tok.eos_token_id, stop_on_eos=False)

    rollouts[lean] = loop()
    print(f"{'LeanDecoder' if lean else 'Hugging Face':12s} decode loop {median_seconds(loop, 5):.3f} s", flush=True)
same = torch.equal(rollouts[False].sequences, rollouts[True].sequences) and torch.equal(rollouts[False].logprobs, rollouts[True].logprobs)
print("same tokens and log-probs bit for bit:", same)
