"""LoRA adapters (peft) on the policy, with the reference read off the same weights.

With ``lora_rank > 0`` the policy is the base model plus low-rank adapters, and the
frozen reference *is* the base model: :class:`~klbelt.rl.scoring.Reference` runs the
same module with the adapters disabled, so no second copy of the weights is ever held.

The bf16 helpers that used to live here are :mod:`klbelt.rl.precision`'s, ``Reference``
is :mod:`klbelt.rl.scoring`'s, the checkpoint format :mod:`klbelt.rl.run_state`'s; this
path still exports them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .hf import adapters_disabled, is_lora, unwrap
from .precision import autocast, bf16_matmul_weights, bf16_supported, hold_base_in_bf16, resolve_bf16, restore_fp32
from .run_state import load_policy_state, policy_state
from .scoring import Reference

__all__ = ["LORA_TARGETS", "linear_module_names", "apply_lora", "adapters_at_zero", "is_lora", "adapters_disabled",
           "autocast", "bf16_matmul_weights", "bf16_supported", "hold_base_in_bf16", "resolve_bf16", "restore_fp32",
           "load_policy_state", "policy_state", "Reference"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama, Mistral, Qwen
                "c_attn", "c_proj", "c_fc",  # GPT-2
                "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # GPT-NeoX


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear-like layers (what LoRA can target)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(policy: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] | None = None):
    """Wrap ``policy`` in peft LoRA adapters of ``rank`` on its attention and MLP projections.

    Only the adapters train; the base weights are frozen and double as the reference.
    ``alpha`` defaults to ``2 * rank``; the adapters start at zero (peft's B = 0), so the
    policy starts exactly at the reference.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lora_rank > 0 needs the PyPI package 'peft': pip install peft (or 'klbelt[train]')") from exc
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    found = linear_module_names(policy)
    wanted = [t for t in (targets or LORA_TARGETS) if t in found and t != "lm_head"]
    if not wanted:
        raise ValueError(
            f"lora_rank={rank}: peft cannot target this model's modules: none of {', '.join(targets or LORA_TARGETS)} "
            f"is a linear layer in {type(policy).__name__}; its linear layers are named: {', '.join(found) or 'none'}"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=wanted, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(policy, config)


def adapters_at_zero(model) -> bool:
    """Whether every LoRA adapter adds exactly nothing (all ``lora_B`` weights 0, peft's initialisation):
    the policy with its adapters on is then the base model, bit for bit."""
    with torch.no_grad():
        return all(not bool(p.any()) for n, p in unwrap(model).named_parameters() if "lora_B" in n)
