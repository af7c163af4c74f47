"""Hugging Face and peft plumbing, written once: the model inside its wrappers, its forward's
arguments, and one forward over a rollout's tokens.

A policy reaches the trainer in up to three wrappers: ``DistributedDataParallel``
(``.module``), peft's ``PeftModel`` (``get_base_model()``) and the Hugging Face
causal LM itself. :func:`unwrap` removes the first, :func:`hf_model` both.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch


def unwrap(model):
    """The model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper; else ``model``."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def hf_model(model):
    """The Hugging Face model inside DDP and peft wrappers (peft's LoRA layers live inside it)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora(model) -> bool:
    """Whether ``model`` (possibly DDP-wrapped) is a peft model whose adapters can be switched off."""
    return hasattr(unwrap(model), "disable_adapter") and hasattr(unwrap(model), "peft_config")


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model (the reference) for the duration of the block; a no-op without adapters."""
    model = unwrap(model)
    if is_lora(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


@functools.lru_cache(maxsize=64)
def _forward_params(forward) -> frozenset:
    return frozenset(inspect.signature(forward).parameters)


def forward_params(model) -> frozenset:
    """Parameter names of ``model.forward`` (looked up once per forward function, not per call).

    peft passes keyword arguments through to the base model, so its forward is the one read.
    """
    forward = hf_model(model).forward
    return _forward_params(getattr(forward, "__func__", forward))


def supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in forward_params(model)


def cache_kwarg(model) -> str:
    """Transformers renamed ``past_key_values`` to ``cache``; the name ``model``'s forward takes."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    return out["cache"] if "cache" in out else out.past_key_values


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_positions(n: int, length: int, device) -> torch.Tensor:
    """``logits_to_keep`` for the last ``n`` of ``length`` positions, as an index tensor.

    Hugging Face slices the hidden states with an int (``[:, -n:]``, a non-contiguous
    view) but gathers them with a tensor (a contiguous copy). On CPU a bf16 linear
    layer on the non-contiguous view takes the batched-matmul path and copies the LM
    head once per sequence: measured here, SmolLM2's head on 16 x 25 positions took
    0.97 s and 900 MB that way against 0.07 s and 38 MB on contiguous rows.
    """
    return torch.arange(length - n, length, device=device)


def forward_tokens(model, sequences: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None, **kwargs):
    """One forward of ``model`` over left-padded ``sequences`` ``[B, L]``, positions counted past the padding.

    ``keep_last``: the LM head runs on the last ``keep_last`` positions only (where the
    model takes ``logits_to_keep``; all positions otherwise).
    """
    if keep_last is not None and supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = last_positions(keep_last, sequences.shape[1], sequences.device)
    return model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask), **kwargs)
