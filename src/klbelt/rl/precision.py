"""Mixed precision for the trainer: bf16 autocast, a LoRA base held in bf16, and fp32 master weights
behind a bf16 or fp16 model, stepped by :func:`optimizer_step`.

``bf16`` wraps the differentiated forward passes in ``torch.autocast`` (matmuls in
bf16) where the CPU or GPU supports it (:func:`resolve_bf16`); the log-softmax and
every KL stay fp32 (``klbelt.kl`` upcasts the logits).

A model held in bf16 or fp16 computes in that dtype (its logits are upcast to
fp32 before any log-softmax, see ``klbelt.kl``), but its weights must not be
*updated* in it: AdamW's ``eps = 1e-8`` is 0 in fp16 (a zero gradient then
gives 0/0 = NaN), and bf16's 8-bit mantissa drops any update smaller than
about 0.4% of a weight, so a low-precision model trained in place stalls or
breaks. The optimizer therefore steps fp32 copies of the trainable weights and
each step's result is rounded back into the model.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from .hf import unwrap


class MasterWeights:
    """fp32 copies of ``model``'s trainable parameters when any of them is not fp32; a no-op otherwise.

    Use: build the optimizer over ``params()``; after ``backward()`` call
    ``grads_to_master()``; clip and step on ``params()``; then ``to_model()``.
    """

    def __init__(self, model: torch.nn.Module):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.active = any(p.dtype != torch.float32 for p in self.model_params)
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.model_params] if self.active else []

    def params(self) -> list[torch.Tensor]:
        """What the optimizer steps: the fp32 masters, or the model's own fp32 parameters."""
        return self.master if self.active else self.model_params

    def grads_to_master(self) -> None:
        """Move the model's gradients (already all-reduced by DDP) onto the masters, in fp32."""
        if not self.active:
            return
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the updated masters into the model's own dtype."""
        for p, m in zip(self.model_params, self.master):
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor] | None:
        return [m.detach().clone() for m in self.master] if self.active else None

    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        if not self.active:
            return
        if state is None or len(state) != len(self.master):
            raise ValueError("resume: the checkpoint has no fp32 master weights for this low-precision model "
                             "(was the run started with the model in another dtype?)")
        with torch.no_grad():
            for m, saved in zip(self.master, state):
                m.copy_(saved)
        self.to_model()


def optimizer_step(loss: torch.Tensor, master: MasterWeights, optimizer, max_grad_norm: float) -> None:
    """Backward, gradients to the fp32 masters, clip, step, and the new weights back to the model."""
    loss.backward()
    master.grads_to_master()
    torch.nn.utils.clip_grad_norm_(master.params(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next pass
    master.to_model()


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
    sampler's packing; docs/english-demo.md, "How one update runs").
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
