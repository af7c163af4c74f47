"""Attention kernels for the trained, reference and sampler forwards (``TrainConfig.attn_implementation``).

``"klbelt_fp32"`` is registered with Hugging Face's attention and mask interfaces:
scores, softmax and the weighted sum are computed in fp32 from the (possibly
bf16) queries, keys and values, with the scores materialised. On a CPU, for the
short sequences of RLHF rollouts, this is faster than the fused SDPA kernels
(whose per-call set-up dominates at a few dozen positions; measured in
``docs/measurements/2026-11-29/speed_probes/attention_kernels.py``) and, unlike
Hugging Face's ``"eager"``, never rounds the attention probabilities to bf16.
Its memory is O(length^2) per head: for long sequences keep ``"sdpa"``.
"""

from __future__ import annotations

import torch

from .hf import hf_model

KLBELT_FP32 = "klbelt_fp32"
AUTO = "auto"  # by device: klbelt_fp32 on the CPU (its fastest there), PyTorch's fused SDPA kernels on a GPU
CHOICES = ("model", "sdpa", "eager", KLBELT_FP32, AUTO)  # "model": whatever the model was loaded with


def resolve(name: str, device) -> str:
    """The implementation ``name`` means on ``device``: ``"auto"`` is ``"klbelt_fp32"`` on the CPU, ``"sdpa"`` elsewhere."""
    _check(name)
    if name != AUTO:
        return name
    return KLBELT_FP32 if torch.device(device).type == "cpu" else "sdpa"


def fp32_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """Hugging Face attention-interface function: ``softmax(q k^T * scaling + mask) v`` in fp32.

    ``query`` ``[B, H, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]`` (grouped
    query attention: each kv head serves ``H / Hkv`` query heads), ``attention_mask``
    additive ``[B, 1, Lq, Lk]`` (Hugging Face's eager mask) or ``None``. Returns the
    output ``[B, Lq, H, D]`` in the query's dtype, and the fp32 probabilities.
    """
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation {KLBELT_FP32!r} does not implement {name!r} "
                             f"({type(module).__name__} uses it); use 'sdpa' or 'eager'")
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"attn_implementation {KLBELT_FP32!r}: {H} query heads do not share {Hkv} key/value heads evenly")
    if scaling is None:
        scaling = D ** -0.5
    dtype = torch.promote_types(query.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    with torch.autocast(query.device.type, enabled=False):  # autocast would run these matmuls in bf16
        # grouped heads without copying the keys: [B, Hkv, G * Lq, D] queries against [B, Hkv, Lk, D]
        q = query.to(dtype).reshape(B, Hkv, (H // Hkv) * Lq, D)
        scores = torch.matmul(q, key.to(dtype).transpose(-1, -2)).mul_(scaling).view(B, H, Lq, Lk)
        if attention_mask is not None:
            scores = scores + attention_mask[..., :Lk].to(dtype)
        probs = torch.softmax(scores, dim=-1)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        out = torch.matmul(probs.view(B, Hkv, (H // Hkv) * Lq, Lk), value.to(dtype)).view(B, H, Lq, D)
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


def _check(name: str) -> None:
    if name not in CHOICES:
        raise ValueError(f"attn_implementation must be one of {', '.join(map(repr, CHOICES))}; got {name!r}")


def register() -> None:
    """Make ``"klbelt_fp32"`` a valid ``attn_implementation`` of every Hugging Face model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(KLBELT_FP32, fp32_attention)
    AttentionMaskInterface.register(KLBELT_FP32, eager_mask)


def current(model) -> str | None:
    """The attention implementation ``model`` (a Hugging Face model, possibly peft-wrapped) runs now."""
    config = getattr(hf_model(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def set_attention(model, name: str) -> str | None:
    """Switch ``model``'s attention to ``name`` (one of :data:`CHOICES`); returns the previous implementation.

    ``"model"`` leaves it as it is. Raises ``ValueError`` for another name, or a model
    that has no Hugging Face attention switch.
    """
    _check(name)
    if name == AUTO:
        name = resolve(name, next(hf_model(model).parameters()).device)
    previous = current(model)
    if name == "model":
        return previous
    hf = hf_model(model)
    if not hasattr(hf, "set_attn_implementation"):
        raise ValueError(f"attn_implementation {name!r} needs a Hugging Face model; {type(hf).__name__} has no set_attn_implementation")
    if name == KLBELT_FP32:
        register()
    hf.set_attn_implementation(name)
    return previous


def set_attention_of(models, name: str) -> list[tuple]:
    """:func:`set_attention` on each of ``models`` (``None`` skipped); returns what :func:`restore_attention` needs."""
    _check(name)
    if name == "model":
        return []
    return [(m, set_attention(m, name)) for m in models if m is not None]


def restore_attention(saved: list[tuple]) -> None:
    """Put back the implementations :func:`set_attention_of` found (a run's choice does not outlive it)."""
    for model, previous in reversed(saved):
        if previous is not None and current(model) != previous:
            hf_model(model).set_attn_implementation(previous)
