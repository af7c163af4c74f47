"""Sampler ``"policy"`` (and ``"bf16"``): a lean KV-cached loop over the model's own forward."""

from __future__ import annotations

import torch

from ..hf import cache_kwarg, forward_tokens, position_ids, returned_cache
from .rollout import Rollout, SamplingParams, blocked_tensor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering (masked entries set to -inf). Off by default."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    policy,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    stop_on_eos: bool = True,
    blocked_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens per prompt with a KV cache.

    A lean loop over the model's forward (no ``generate()``): one full prompt
    pass, then one token per step. ``blocked_token_ids`` are never sampled
    (e.g. EOS, to force full-length continuations): they are removed from the
    policy's distribution, which renormalises, and the rollout remembers them so
    that every later log-prob (policy, reference, training) uses the same
    renormalised distribution. Rows that emitted EOS keep receiving
    ``pad_token_id`` (masked out) until every row is done.

    Tokens are drawn by inverse-CDF sampling from ``uniforms`` ``[B,
    max_new_tokens]`` in [0, 1) (drawn from ``generator`` when not given): row
    b's step-t token depends only on ``uniforms[b, t]`` and its own
    distribution, never on the other rows. So a global batch split across
    data-parallel ranks (each rank passing its rows of one shared draw) samples
    the same tokens as one process sampling the whole batch.

    ``top_k`` / ``top_p`` make a sampler mu other than the model: the tokens are drawn
    from the filtered, renormalised distribution and the rollout records mu's
    log-probs of them (and the mass each step's filter dropped, ``filtered_mass``),
    so a trainer recomputes the model's own log-probs as for any other sampler.
    The keyword arguments from ``max_new_tokens`` to ``pad_token_id`` are a
    :class:`~klbelt.rl.sampling.SamplingParams`.
    """
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, eos_token_id, stop_on_eos,
                            tuple(blocked_token_ids), pad_token_id)
    return _sample(policy, prompt_ids, prompt_mask, params, generator, uniforms)


def _sample(policy, prompt_ids, prompt_mask, params: SamplingParams, generator, uniforms) -> Rollout:
    B, P = prompt_ids.shape
    device = prompt_ids.device
    T = params.max_new_tokens
    if uniforms is None:
        uniforms = torch.rand(B, T, generator=generator, device=device)
    elif uniforms.shape != (B, T):
        raise ValueError(f"uniforms must be [B, max_new_tokens] = ({B}, {T}), got {tuple(uniforms.shape)}")
    cache_kw = cache_kwarg(policy)
    # the whole attention mask up front; step t attends to its first P + t columns (no cat per step)
    attention = torch.cat([prompt_mask.long(), prompt_mask.new_ones(B, T, dtype=torch.long)], dim=1)
    prompt_attention = attention[:, :P]
    out = forward_tokens(policy, prompt_ids, prompt_attention, keep_last=1, use_cache=True)  # one row of logits
    logits = out.logits[:, -1].float()
    cache = returned_cache(out)
    next_pos = position_ids(prompt_attention)[:, -1:] + 1
    filtered = bool(params.top_k and params.top_k < logits.shape[-1]) or params.top_p < 1.0
    blocked = blocked_tensor(params.blocked_token_ids, device)
    can_stop = params.stop_on_eos and params.eos_token_id is not None
    tokens, logps, dropped, response_mask = [], [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(T):
        scaled = logits / params.temperature if params.temperature != 1.0 else logits
        if blocked is not None:
            # Blocked tokens are removed from the policy itself (the rest renormalises), so the
            # recorded log-probs, the reference's and the trained ones all describe the
            # distribution the tokens really came from: otherwise a policy could move mass onto
            # a never-sampled token and make every k1 estimate negative (a KL "bonus").
            scaled = scaled.index_fill(-1, blocked, float("-inf"))
        if filtered:  # mu = the filtered, renormalised distribution: its log-probs are recorded
            kept = filter_logits(scaled, params.top_k, params.top_p)
            logp_all = torch.log_softmax(kept, dim=-1)
            dropped.append(1.0 - torch.softmax(scaled, dim=-1).masked_fill(kept == float("-inf"), 0.0).sum(-1))
        else:
            logp_all = torch.log_softmax(scaled, dim=-1)
        weights = logp_all.exp()
        token = inverse_cdf(weights, uniforms[:, step])
        if can_stop:
            token = torch.where(alive, token, torch.full_like(token, params.pad_token_id))
            response_mask.append(alive)
        tokens.append(token)
        logps.append(logp_all.gather(-1, token[:, None]).squeeze(-1))
        if can_stop:
            alive = alive & (token != params.eos_token_id)
            if not bool(alive.any()):
                break
        if step + 1 == T:
            break
        out = policy(
            input_ids=token[:, None], attention_mask=attention[:, : P + step + 1], position_ids=next_pos, use_cache=True, **{cache_kw: cache}
        )
        cache = returned_cache(out)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    responses = torch.stack(tokens, dim=1)
    R = responses.shape[1]
    mask = torch.stack(response_mask, dim=1).float() if can_stop else torch.ones(B, R, device=device)
    logprobs = torch.stack(logps, dim=1) * mask
    filtered_mass = (torch.stack(dropped, dim=1).clamp_min(0.0) * mask) if filtered else None
    sequences = torch.cat([prompt_ids, responses], dim=1)
    full_mask = attention[:, : P + R].contiguous()
    return Rollout(sequences, full_mask, P, mask, logprobs, tuple(sorted(set(params.blocked_token_ids))), filtered_mass)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i of each row with ``cdf[i-1] <= u * total < cdf[i]``: a draw from ``weights`` (unnormalised, >= 0).

    ``weights`` ``[B, V]``, ``u`` ``[B]`` in [0, 1). A zero-weight entry is never chosen:
    the point is kept strictly below the total, and ``right=True`` skips flat steps of the CDF.
    """
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    point = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def bf16_sample(policy, *args, **kwargs) -> Rollout:
    """:func:`sample` under bf16 autocast (KV cache and all): the same weights, other numerics.
    Its recorded log-probs are the bf16 sampler's (fp32 tensors of bf16 logits)."""
    device = next(policy.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return sample(policy, *args, **kwargs)
