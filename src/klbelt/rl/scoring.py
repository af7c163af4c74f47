"""Scoring rollouts: log-probs of the sampled tokens, entropy, the frozen reference and its exact KL.

For a Hugging Face model whose output embedding is a plain ``nn.Linear`` the
``[B, R, V]`` logits are never built (the fused head): the decoder body's last
hidden states go through :func:`~klbelt.kl.logprobs_from_hidden`. Whether to
use it is the ``fused`` argument of each function (the trainer passes
``TrainConfig.fused_head``); left out, it is the process default of
:func:`set_fused_head` (on).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..kl import kl_from_logits, logprobs_from_hidden, logprobs_from_logits
from .hf import adapters_disabled, forward_tokens, hf_model, is_lora, supports_logits_to_keep, unwrap
from .sampling.rollout import Rollout

# Post-head transforms that make logits != head(last hidden state); fused scoring refuses them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
_head_verified: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
_fallback_warned: set[str] = set()
_DEFAULT = {"fused": True}


def set_fused_head(enabled: bool) -> bool:
    """The default of ``fused`` for calls that leave it out: hidden states (True) or full logits; returns the
    previous default. The trainer never reads it: it passes its config's ``fused_head``."""
    previous, _DEFAULT["fused"] = _DEFAULT["fused"], bool(enabled)
    return previous


def _fused(fused: bool | None) -> bool:
    return _DEFAULT["fused"] if fused is None else bool(fused)


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits ``[B, R, V]`` that predict each response token (the lm head runs on R positions only)."""
    R = rollout.response_len
    out = forward_tokens(model, rollout.sequences, rollout.attention_mask, keep_last=R + 1)
    logits = out.logits[:, -(R + 1) : -1]
    blocked = rollout.blocked(logits.device)
    if blocked is not None:  # the sampling distribution had these removed (see ``sample``)
        logits = logits.index_fill(-1, blocked, float("-inf"))
    return logits


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False,
                      fused: bool | None = None):
    """Log-probs ``[B, R]`` (fp32) of the response tokens under ``model`` at ``temperature``.

    With ``with_entropy``, also the per-token entropy ``[B, R]`` (nats) of the
    tempered distribution, detached (for monitoring).

    ``fused`` (default: :func:`set_fused_head`'s, on): for a Hugging Face model whose
    output embedding is a plain ``nn.Linear`` the ``[B, R, V]`` logits are never built:
    the decoder body's last hidden states go through
    :func:`~klbelt.kl.logprobs_from_hidden` (see :func:`fused_head`); other models fall
    back to the logits, with one warning.
    """
    head = fused_head(model) if _fused(fused) else None
    if head is not None:
        result = _fused_response_logprobs(model, head, rollout, temperature, with_entropy)
        if result is not None:
            return result
    logits = response_logits(model, rollout)
    logprobs = logprobs_from_logits(logits, rollout.responses, temperature=temperature) * rollout.response_mask
    if not with_entropy:
        return logprobs
    return logprobs, entropy_from_logits(logits.detach(), temperature) * rollout.response_mask


def _fall_back(model, reason: str) -> None:
    key = f"{type(model).__name__}: {reason}"
    if key not in _fallback_warned:
        _fallback_warned.add(key)
        warnings.warn(
            f"klbelt: scoring {type(model).__name__} from its full [B, R, V] logits (more memory): {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def fused_head(model) -> torch.nn.Linear | None:
    """The LM head if ``model``'s log-probs can be computed from hidden states, else ``None`` (warned once).

    Needs a Hugging Face causal LM (``get_output_embeddings()`` a plain
    ``nn.Linear``, ``base_model`` its decoder body, ``logits_to_keep``
    supported) and no soft-capping or scaling of the logits after the head.
    """
    hf = hf_model(model)
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:
        _fall_back(model, f"its output embedding is {type(head).__name__}, not a plain torch.nn.Linear")
        return None
    if _head_verified.get(head) is False:
        return None
    config = getattr(hf, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            _fall_back(model, f"config.{name} = {value} transforms the logits after the LM head")
            _head_verified[head] = False
            return None
    if getattr(hf, "base_model", hf) is hf or not supports_logits_to_keep(model):
        _fall_back(model, "it has no separate decoder body (base_model) or no logits_to_keep argument")
        _head_verified[head] = False
        return None
    return head


def _fused_response_logprobs(model, head, rollout: Rollout, temperature: float, with_entropy: bool):
    """``response_logprobs`` from the body's last hidden states; ``None`` if the model's logits are not ``head(h)``."""
    R = rollout.response_len
    captured = []
    body = hf_model(model).base_model

    def keep_hidden(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = body.register_forward_hook(keep_hidden)
    try:  # the head runs on one position; the response is scored below
        out = forward_tokens(model, rollout.sequences, rollout.attention_mask, keep_last=1)
    finally:
        hook.remove()
    hidden = captured[-1]
    if head not in _head_verified:  # once per head: the model's last logits must be head(h) exactly
        with torch.no_grad():
            mine = head(hidden[:, -1:].to(head.weight.dtype)).float()
            theirs = out.logits[:, -1:].float()
            ok = mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * (1 + float(theirs.abs().max())))
        _head_verified[head] = bool(ok)
        if not ok:
            _fall_back(model, "its logits are not lm_head(last hidden state) (soft-capping or scaling in its forward?)")
            return None
    del out
    result = logprobs_from_hidden(
        hidden[:, -(R + 1) : -1].to(head.weight.dtype), head.weight, rollout.responses,
        bias=head.bias, temperature=temperature, with_entropy=with_entropy, blocked=rollout.blocked(hidden.device),
    )
    if not with_entropy:
        return result * rollout.response_mask
    return result[0] * rollout.response_mask, result[1] * rollout.response_mask


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int | None = None) -> torch.Tensor:
    """H(softmax(z / T)) = -sum_v p_v log p_v per position, computed in row blocks (nats).

    Blocks of ``chunk_rows`` rows (default: about 256K logits, 1 MB in fp32) keep
    the temporaries small next to the logits, which the caller holds anyway.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = chunk_rows or max(1, (1 << 18) // max(1, flat.shape[-1]))
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], rows):
        block = flat[s : s + rows].float()
        logp = torch.log_softmax(block / temperature if temperature != 1.0 else block, dim=-1)
        plogp = logp.exp().mul_(logp)
        out[s : s + rows] = -plogp.masked_fill_(logp == float("-inf"), 0.0).sum(-1)  # 0 log 0 = 0 (blocked tokens)
    return out.reshape(logits.shape[:-1])


class Reference:
    """Scores rollouts under the frozen reference: a separate model, or the policy with its adapters off.

    ``fused``: the fused head for its log-probs (see :func:`response_logprobs`).
    """

    def __init__(self, policy, ref_model=None, fused: bool | None = None):
        self.policy, self.model, self.fused = policy, ref_model, fused
        self.shared = ref_model is None
        if self.shared and not is_lora(policy):
            raise ValueError("a reference model is needed unless the policy has LoRA adapters (lora_rank > 0)")

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        if self.shared:
            with adapters_disabled(self.policy) as base:
                return response_logprobs(base, rollout, temperature, fused=self.fused)
        return response_logprobs(self.model, rollout, temperature, fused=self.fused)

    @torch.no_grad()
    def exact_kl(self, policy, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        """``[B, R]`` exact KL(pi || ref) over the full vocabulary at each response position
        (nats/token; blocked tokens removed from both; 0 on masked positions).

        It depends on the visited states only, never on which token the sampler drew
        there, so it stays the KL at those states whatever the sampler (top-k/top-p
        included, whose support misses tokens that pi and ref give mass to)."""
        logits = response_logits(policy, rollout).float()
        if self.shared:
            with adapters_disabled(self.policy) as base:
                ref_logits = response_logits(base, rollout).float()
        else:
            ref_logits = response_logits(self.model, rollout).float()
        return kl_from_logits(logits, ref_logits, temperature=temperature) * rollout.response_mask

    def base_parameters(self) -> list[torch.Tensor]:
        """The reference's weights (for its fingerprint): the frozen base weights under LoRA."""
        if self.shared:
            return [p for n, p in unwrap(self.policy).named_parameters() if "lora_" not in n]
        return list(self.model.parameters())
