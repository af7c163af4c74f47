"""Sampler ``"bf16-merged"``: rollouts from a bf16 copy of the policy's weights, LoRA merged in.

What an inference engine does (vLLM, SGLang: their own weights, synced from
the trainer after each update), in process and without a second framework:
the copy is built once from the policy (meta-device skeleton, then the
weights cast to bf16), and before each rollout the weights that can have
moved are rewritten in place: under LoRA, each adapted layer's
``W + scale * B A``; in a full fine-tune, every trained weight. Sampling
then runs :func:`klbelt.rl.rollout.sample` on plain bf16 weights: no LoRA
side-paths and no per-call fp32 -> bf16 casts in the decode loop.

The copy is a different numerical policy mu (bf16 weights, the adapters
rounded into them), so the trainer treats it like any other sampler: it
recomputes pi's log-probs of the sampled tokens and reports the mismatch
(:class:`~klbelt.rl.samplers.RolloutCorrection`). Cost: one bf16 copy of the
weights (2 bytes/parameter) held beside the policy.
"""

from __future__ import annotations

import torch

from .rollout import Rollout, _hf_model, sample


def merged_tensors(policy):
    """``(name, tensor)`` of the policy's weights under the plain Hugging Face names, one at a time.

    LoRA (peft): each adapted layer's ``W + scale * B A`` (peft's own
    ``get_delta_weight``), computed when its turn comes, without touching the
    trained model; adapter tensors dropped. Tensors that share storage (tied
    embeddings) appear once, under their first name. Unmerged tensors are the
    model's own (detach before writing to them); merged ones are new, in fp32
    (a bf16 base plus fp32 adapters is summed in fp32 and rounded once by the caller).
    """
    model = _hf_model(policy)
    adapted = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                adapted[name] = (module, active)
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        layer = name[: -len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        if layer in adapted:
            module, active = adapted[layer]
            with torch.no_grad():
                tensor = tensor.float() + sum(module.get_delta_weight(a).float() for a in active)  # merged in fp32
        yield name.replace(".base_layer.", "."), tensor


def _moving(policy) -> set[str]:
    """Plain names of the weights a training step can change: LoRA-adapted layers' weights, trained parameters."""
    model = _hf_model(policy)
    names = set()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            names.add(name.split(".lora_")[0] + ".weight")
        elif param.requires_grad:
            names.add(name.replace(".base_layer.", "."))
    return names


class MergedCopySampler:
    """A sampling function (same signature as :func:`~klbelt.rl.rollout.sample`) over a low-precision
    copy of the policy that it rewrites from the policy before every rollout.

    ``dtype``: the copy's weights (bf16 for the ``"bf16-merged"`` sampler;
    ``torch.float32`` gives a copy whose log-probs equal the policy's, which the
    tests use). Buffers (rotary tables) are the policy's own, copied as they are.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.copy = None
        self._targets: dict[str, torch.Tensor] = {}
        self._moving: set[str] = set()

    def _build(self, policy) -> None:
        hf = _hf_model(policy)
        try:
            with torch.device("meta"):
                copy = type(hf)(hf.config)
        except Exception as exc:  # not a Hugging Face PreTrainedModel with a config
            raise ValueError(f"sampler 'bf16-merged' needs a Hugging Face causal LM; cannot rebuild {type(hf).__name__}: {exc}") from None
        device = next(hf.parameters()).device
        state = {name: t.detach().to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype, copy=True)
                 for name, t in merged_tensors(policy)}
        missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
        copy.tie_weights()
        buffers = {name.replace(".base_layer.", "."): b for name, b in hf.named_buffers()}
        for name, _ in list(copy.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner)._buffers[leaf] = buffers[name].detach().clone()
        left = [n for n, p in copy.named_parameters() if p.is_meta]
        if left or unexpected:
            raise ValueError(f"sampler 'bf16-merged': the copy of {type(hf).__name__} does not match its weights "
                             f"(unfilled {left[:3]}, unexpected {list(unexpected)[:3]})")
        self.copy = copy.eval().requires_grad_(False)
        self._targets = dict(self.copy.named_parameters())
        self._moving = _moving(policy)

    @torch.no_grad()
    def refresh(self, policy) -> None:
        """Rewrite the copy's moving weights from the policy (the engine's weight sync)."""
        if self.copy is None:
            self._build(policy)
            return
        for name, tensor in merged_tensors(policy):
            if name in self._moving and name in self._targets:
                self._targets[name].copy_(tensor)

    def __call__(self, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> Rollout:
        """Sync the copy from ``policy``, then :func:`~klbelt.rl.rollout.sample` from it (log-probs are the copy's)."""
        self.refresh(policy)
        return sample(self.copy, prompt_ids, prompt_mask, **kwargs)

    def close(self) -> None:
        self.copy, self._targets = None, {}
