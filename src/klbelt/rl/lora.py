"""The fast real-model path: LoRA adapters (peft) with the reference read off the same weights,
and bf16 autocast where the CPU supports it.

With ``lora_rank > 0`` the policy is the base model plus low-rank adapters, and the
frozen reference *is* the base model: ``reference_logprobs`` runs the same module
with the adapters disabled, so no second copy of the weights is ever held.
``bf16`` wraps the differentiated forward passes in ``torch.autocast`` (matmuls in
bf16); the log-softmax and every KL stay fp32 (``klbelt.kl`` upcasts the logits).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from ..kl import kl_from_logits
from .rollout import Rollout, response_logits, response_logprobs, unwrap

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


def _matmul_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D is an addmm


def bf16_matmul_weights(policy) -> list[nn.Parameter]:
    """The frozen weights that bf16 autocast only ever reads as bf16: the base's linear layers.

    Weights and biases of the base model's linear (and GPT-2 ``Conv1D``) layers that do
    not train, minus the adapters and the output embedding, and minus any tensor another
    kind of module also holds (tied input embeddings, which an embedding lookup reads in
    full precision). Under ``torch.autocast`` every use of these is a matmul that casts
    them to bf16 first.
    """
    model = unwrap(policy)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    chosen = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if not _matmul_layer(module) or "lora_" in name:
            excluded.update(id(p) for p in own)
            continue
        for p in own:
            if not p.requires_grad and p.is_floating_point():
                chosen[id(p)] = p
    return [p for key, p in chosen.items() if key not in excluded]


def hold_base_in_bf16(policy) -> list[nn.Parameter]:
    """Store the frozen fp32 linear weights of a LoRA policy in bf16, in place; returns them (for :func:`restore_fp32`).

    Exact under autocast: the stored values are the ones autocast would cast the fp32
    weights to before every matmul (round to nearest even, once), so every pass run under
    bf16 autocast computes the same numbers as before, bit for bit; only the casts (and
    the bf16 copies autograd saves for the backward) are gone. Embeddings, norms, the
    output embedding and the adapters keep their dtype. Passes that run outside autocast
    would see bf16 weights: the trainer holds the base in bf16 only when every pass on the
    base runs under autocast (bf16 on, a sampler other than "policy").

    The other frozen tensors are copied into memory of their own: a model loaded from
    safetensors views one mmap of the file, and every page of it that was read stays
    resident (and counted in RSS) while any tensor views it, so without this the fp32
    file would stay beside its bf16 copies. On SmolLM2 the demo update's peak RSS
    fell from 2442 to 2038 MB with both (6 updates through ``train()``, before the
    sampler's packing; README, "How one update runs").
    """
    params = [p for p in bf16_matmul_weights(policy) if p.dtype == torch.float32]  # (fp16 weights stay as they are)
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    # the other frozen tensors get memory of their own, so the loaded file's mmap is released
    held = {id(p) for p in params}
    for name, p in unwrap(policy).named_parameters():
        if id(p) not in held and not p.requires_grad and "lora_" not in name:
            p.data = p.data.clone()
    for module in unwrap(policy).modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.clone()
    return params


def restore_fp32(params: list[nn.Parameter]) -> None:
    """Back to fp32 storage after :func:`hold_base_in_bf16` (the values stay the bf16-rounded ones)."""
    for p in params:
        p.data = p.data.float()


def adapters_at_zero(model) -> bool:
    """Whether every LoRA adapter adds exactly nothing (all ``lora_B`` weights 0, peft's initialisation):
    the policy with its adapters on is then the base model, bit for bit."""
    with torch.no_grad():
        return all(not bool(p.any()) for n, p in unwrap(model).named_parameters() if "lora_B" in n)


def is_lora(model) -> bool:
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


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """Whether this CPU has native bf16 matmuls (oneDNN: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch builds
        return False


def autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast`` to bf16 on ``device`` when ``enabled``; else a no-op context."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def resolve_bf16(requested: bool, device: torch.device | str) -> bool:
    """bf16 autocast if requested and supported; says so once and runs fp32 otherwise."""
    if not requested:
        return False
    device = torch.device(device)
    if device.type == "cpu" and not bf16_supported():
        warnings.warn("bf16 was requested but this CPU has no native bf16 support (AVX512-BF16/AMX); running in fp32", RuntimeWarning, stacklevel=2)
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("bf16 was requested but this GPU does not support it; running in fp32", RuntimeWarning, stacklevel=2)
        return False
    return True


class Reference:
    """Scores rollouts under the frozen reference: a separate model, or the policy with its adapters off."""

    def __init__(self, policy, ref_model=None):
        self.policy, self.model = policy, ref_model
        self.shared = ref_model is None
        if self.shared and not is_lora(policy):
            raise ValueError("a reference model is needed unless the policy has LoRA adapters (lora_rank > 0)")

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        if self.shared:
            with adapters_disabled(self.policy) as base:
                return response_logprobs(base, rollout, temperature)
        return response_logprobs(self.model, rollout, temperature)

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


def policy_state(policy) -> dict:
    """What a checkpoint keeps of the policy: every weight, or only the adapters under LoRA
    (the base weights are the reference, restored by loading the same model)."""
    model = unwrap(policy)
    if is_lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def load_policy_state(policy, state: dict) -> None:
    model = unwrap(policy)
    if is_lora(model):
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise ValueError(f"resume: the checkpoint has no LoRA weights for {missing[0]} (was it written with the same lora_rank?)")
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state)
