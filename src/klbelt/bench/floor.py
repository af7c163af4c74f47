"""The floor: the passes no update can avoid, each timed alone on the same Hugging Face modules.

A trainer is compared with the sum of these passes (``floor_ratio`` = trainer seconds per
update / floor seconds); whatever a trainer spends above it is its own overhead. Each
pass is timed in rounds over all passes (so drift hits them alike), median per pass.

* :func:`gpt2_floor` (``klbelt bench trainer``, PPO with a critic): the generation steps
  (prompt pass + one cached decode step per further token, sampling included), one
  reference, value and reward forward over the batch, and epochs x minibatches x
  (policy forward+backward, value forward+backward, the two AdamW steps). Like any
  batched trainer it passes attention masks and position ids, and computes logits and
  values at the response positions only.
* :func:`english_floor` (``--model``, the English demo's critic-free update): generation (a
  KV-cached loop on the sampler the demo uses, with its weight sync), one reference forward
  (adapters off, in the numerics the trainer scores it with), one policy forward+backward
  (bf16 autocast where klbelt uses it) and one AdamW step on the adapters.
"""

from __future__ import annotations

from ._timing import peak_rss_mb, time_passes
from .work import english_work, gpt2_work


def _sampler(model, cache_model, prompt_ids, prompt_mask, response_tokens: int, generator, positions):
    """A KV-cached sampling loop at temperature 1: prompt pass, then one decode step per further token.

    ``cache_model`` is the Hugging Face model whose forward names the cache argument.
    """
    import torch

    from klbelt.rl.hf import cache_kwarg, returned_cache

    B = prompt_ids.shape[0]
    cache_kw = cache_kwarg(cache_model)

    @torch.no_grad()
    def generate(**first_kwargs):
        mask = prompt_mask
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, **first_kwargs)
        pos = positions(mask)[:, -1:] + 1
        tokens = []
        for step in range(response_tokens):
            token = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=generator)
            tokens.append(token)
            if step + 1 == response_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: returned_cache(out)})
            pos = pos + 1
        return torch.cat([prompt_ids] + tokens, 1)

    return generate


def gpt2_floor(spec: dict) -> dict:
    """Seconds of each unavoidable pass of one PPO update with a critic (medians), and their sum."""
    import copy

    import torch
    from torch import nn

    from klbelt.kl import logprobs_from_logits

    tok, prompts, policy, ref, reward = gpt2_work(spec)
    B, R, E, M = spec["batch"], spec["response_tokens"], spec["epochs"], spec["minibatches"]
    mb = B // M
    enc = tok(prompts[:B], return_tensors="pt", padding=True)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    P = prompt_ids.shape[1]
    trunk = copy.deepcopy(policy.transformer).train(False)
    head = nn.Linear(spec["dim"], 1)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    value_opt = torch.optim.AdamW(list(trunk.parameters()) + list(head.parameters()), lr=1e-5)

    def positions(mask):
        return (mask.cumsum(-1) - 1).clamp_min(0)

    sample = _sampler(policy, policy, prompt_ids, prompt_mask, R, torch.Generator().manual_seed(spec["seed"]), positions)

    def generate():
        return sample(logits_to_keep=1)

    seq = generate()
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, R)], 1)
    pos_full = positions(full_mask)
    responses = seq[:, P:]

    def values_of(rows):
        hidden = trunk(input_ids=seq[rows], attention_mask=full_mask[rows], position_ids=pos_full[rows]).last_hidden_state
        return head(hidden[:, P - 1 : -1]).squeeze(-1)

    @torch.no_grad()
    def ref_forward():
        return ref(input_ids=seq, attention_mask=full_mask, position_ids=pos_full, logits_to_keep=R + 1).logits

    @torch.no_grad()
    def value_forward():
        return values_of(slice(None))

    @torch.no_grad()
    def reward_forward():
        hidden = reward.transformer(input_ids=seq, attention_mask=full_mask, position_ids=pos_full).last_hidden_state
        return reward.score(hidden[:, -1])

    rows = slice(0, mb)

    def policy_fb():
        policy.zero_grad(set_to_none=True)
        logits = policy(input_ids=seq[rows], attention_mask=full_mask[rows], position_ids=pos_full[rows], logits_to_keep=R + 1).logits
        logprobs_from_logits(logits[:, :-1], responses[rows]).mean().backward()

    def value_fb():
        trunk.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        values_of(rows).square().mean().backward()

    policy_fb()
    value_fb()  # gradients exist, so the optimiser steps below do the full update

    def opt_steps():
        policy_opt.step()
        value_opt.step()

    passes = {
        "generation": (generate, 1),
        "ref_forward": (ref_forward, 1),
        "value_forward": (value_forward, 1),
        "reward_forward": (reward_forward, 1),
        "policy_forward_backward": (policy_fb, E * M),
        "value_forward_backward": (value_fb, E * M),
        "optimizer_steps": (opt_steps, E * M),
    }
    medians = time_passes({name: fn for name, (fn, _) in passes.items()}, spec["floor_repeats"], warmup_rounds=2)
    parts = {name: count * medians[name] for name, (_, count) in passes.items()}
    return {"seconds_per_update": sum(parts.values()), "parts": parts}


def english_floor(spec: dict) -> dict:
    """Seconds of each unavoidable pass of the English demo's update (medians), their sum and the peak RSS.

    The passes run with the demo's own choices, each timed alone: sampling from the
    sampler the config names (``"bf16-merged"``: the bf16 copy's weight sync plus a
    KV-cached loop on it, its linear layers packed where the CPU allows, through
    klbelt's decode forward where the sampler uses it; otherwise a
    KV-cached loop on the LoRA policy, fp32), the base's linear weights held in bf16
    when the config says ``bf16_base``, the
    reference forward (adapters off; under bf16 autocast when the trainer scores the
    reference so, i.e. bf16 with a sampler other than the policy), one policy
    forward+backward (bf16 autocast where klbelt uses it) and one AdamW step.
    """
    import torch

    from klbelt.kl import logprobs_from_logits
    from klbelt.rl.attention import resolve, set_attention
    from klbelt.rl.hf import adapters_disabled
    from klbelt.rl.lora import apply_lora
    from klbelt.rl.precision import autocast, hold_base_in_bf16
    from klbelt.rl.sampling.merged import MergedCopySampler
    from klbelt.rl.hf import last_positions, position_ids

    model, tok, prompts, cfg = english_work(spec)
    device = torch.device(cfg.device)
    model.to(device)
    set_attention(model, resolve(cfg.attn_implementation, device))  # the demo's attention kernel on this device
    policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.bf16 and cfg.bf16_base:  # (the config refuses it with the "policy" sampler)
        hold_base_in_bf16(policy)  # as the trainer does: exact under the autocast every pass below runs in
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    batch = [p for p in prompts[: cfg.batch_size // cfg.group_size] for _ in range(cfg.group_size)]
    enc = tok(batch, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    B, P, R = ids.shape[0], ids.shape[1], cfg.max_new_tokens
    if cfg.sampler == "bf16-merged":
        copy = MergedCopySampler(torch.bfloat16)
        copy.refresh(policy)
        if copy.decoder is not None:  # klbelt's decode loop over the copy, as the demo samples
            copy.decoder.reserve(R)
        sampling_model = copy.decoder or copy.copy
        loop = _sampler(sampling_model, sampling_model, ids, mask, R, torch.Generator(device).manual_seed(0), position_ids)

        def generate():
            copy.refresh(policy)
            return loop()
    else:
        generate = _sampler(policy, policy.get_base_model(), ids, mask, R, torch.Generator(device).manual_seed(0), position_ids)
    ref_bf16 = cfg.bf16 and cfg.sampler != "policy"

    seq = generate()
    full = torch.cat([mask, mask.new_ones(B, R)], 1)
    pos_full = position_ids(full)
    responses = seq[:, P:]
    keep = last_positions(R + 1, P + R, seq.device)  # contiguous rows, as klbelt gathers them

    @torch.no_grad()
    def ref_forward():
        with adapters_disabled(policy) as ref, autocast(device, ref_bf16):
            return ref(input_ids=seq, attention_mask=full, position_ids=pos_full, logits_to_keep=keep).logits

    def policy_fb():
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg.bf16):
            logits = policy(input_ids=seq, attention_mask=full, position_ids=pos_full, logits_to_keep=keep).logits
        logprobs_from_logits(logits[:, :-1], responses).mean().backward()

    policy_fb()
    passes = {"generation": generate, "ref_forward": ref_forward, "policy_forward_backward": policy_fb, "optimizer_step": opt.step}
    sync = torch.cuda.synchronize if device.type == "cuda" else None  # a pass ends when the GPU has run it
    parts = time_passes(passes, spec["floor_repeats"], warmup_rounds=1, sync=sync)
    return {"seconds_per_update": sum(parts.values()), "parts": parts, "peak_rss_mb": peak_rss_mb()}
