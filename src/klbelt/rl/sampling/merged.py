"""Sampler ``"bf16-merged"``: rollouts from a bf16 copy of the policy's weights, LoRA merged in.

What an inference engine does (vLLM, SGLang: their own weights, synced from
the trainer after each update), in process and without a second framework:
the copy is built once from the policy (meta-device skeleton, then the
weights cast to bf16), and before each rollout the weights that can have
moved are rewritten in place: under LoRA, each adapted layer's
``W + scale * B A``; in a full fine-tune, every trained weight. Sampling
then runs :func:`klbelt.rl.sampling.sample` on plain bf16 weights: no LoRA
side-paths and no per-call fp32 -> bf16 casts in the decode loop.

The copy is a different numerical policy mu (bf16 weights, the adapters
rounded into them), so the trainer treats it like any other sampler: it
recomputes pi's log-probs of the sampled tokens and reports the mismatch
(:class:`~klbelt.rl.importance.RolloutCorrection`). Cost: one bf16 copy of the
weights (2 bytes/parameter) held beside the policy.

On a CPU with native bf16 the copy's linear layers hold their weights in
oneDNN's blocked layout (:class:`PackedLinear`), packed once per weight sync
instead of on every call: the decode loop's matmuls (16 rows against each
weight) measured 152 us against 266 us per 576 x 1536 weight, the tied LM head
3.8 ms against 7.0 ms per step, with outputs equal to ``F.linear``'s bit for bit
(docs/measurements/2026-11-29/speed_probes/packed.py). Packed weights that the
next sync rewrites anyway are freed after each rollout (214 MB on SmolLM2 under
LoRA, dead memory while the trainer works), and frozen embeddings are looked up
in the policy's own table, the rows cast (:class:`CastEmbedding`), so a tied LM
head's packed copy is the only copy of that table the sampler holds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import KLBELT_FP32
from ..hf import hf_model
from ..precision import bf16_supported
from .policy import sample
from .rollout import Rollout


def packing_available() -> bool:
    """Whether this torch and CPU can hold bf16 linear weights prepacked for oneDNN."""
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise") and bf16_supported()


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight is stored in oneDNN's blocked layout, for inference.

    ``F.linear`` on CPU reorders a plain bf16 weight into that layout on every call; this
    layer does it once, in :meth:`pack`, and gives the same outputs bit for bit. No
    gradients (the copy never trains).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rows_hint = max(1, int(rows_hint))
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        self.packed = None
        self.pack(weight)

    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"PackedLinear.pack: weight must be {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), self.rows_hint)

    @torch.no_grad()
    def set_bias(self, bias: torch.Tensor) -> None:
        self.bias = bias.detach().to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise RuntimeError("PackedLinear: its weight was released after the last rollout; the sampler's refresh packs it again")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed"


class CastEmbedding(nn.Module):
    """An embedding lookup in the policy's own (frozen) table, each looked-up row cast to ``dtype``.

    Casting the rows after the lookup gives the values of a lookup in a table cast
    first, without holding that second table.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self._source, self.dtype = (weight,), dtype  # in a tuple: not registered, the policy owns it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self._source[0].detach()).to(self.dtype)


def merged_tensors(policy):
    """``(name, tensor)`` of the policy's weights under the plain Hugging Face names, one at a time.

    LoRA (peft): each adapted layer's ``W + scale * B A`` (peft's own
    ``get_delta_weight``), computed when its turn comes, without touching the
    trained model; adapter tensors dropped. Tensors that share storage (tied
    embeddings) appear once, under their first name. Unmerged tensors are the
    model's own (detach before writing to them); merged ones are new, in fp32
    (a bf16 base plus fp32 adapters is summed in fp32 and rounded once by the caller).
    """
    model = hf_model(policy)
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
            with torch.no_grad():  # merged in fp32: the deltas' sum, then the base added into it in place (one fp32 tensor)
                delta = module.get_delta_weight(active[0]).float()
                for a in active[1:]:
                    delta = delta + module.get_delta_weight(a).float()
                exact = tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)  # read as fp32 without rounding
                tensor = delta.add_(tensor if exact else tensor.float())  # = tensor.float() + delta, bit for bit (addition commutes)
        yield name.replace(".base_layer.", "."), tensor


def _moving(policy) -> set[str]:
    """Plain names of the weights a training step can change: LoRA-adapted layers' weights, trained parameters."""
    model = hf_model(policy)
    names = set()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            names.add(name.split(".lora_")[0] + ".weight")
        elif param.requires_grad:
            names.add(name.replace(".base_layer.", "."))
    return names


class MergedCopySampler:
    """A sampling function (same signature as :func:`~klbelt.rl.sampling.sample`) over a low-precision
    copy of the policy that it rewrites from the policy before every rollout.

    ``dtype``: the copy's weights (bf16 for the ``"bf16-merged"`` sampler;
    ``torch.float32`` gives a copy whose log-probs equal the policy's, which the
    tests use). Buffers (rotary tables) are the policy's own, copied as they are.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, pack: bool | None = None, lean: bool | None = None):
        if pack and not (dtype == torch.bfloat16 and packing_available()):
            raise ValueError(f"MergedCopySampler pack=True needs dtype bfloat16 and a CPU/torch with oneDNN bf16 (got dtype {dtype})")
        self.dtype = dtype
        self.pack = (dtype == torch.bfloat16 and packing_available()) if pack is None else bool(pack)
        self.lean = lean  # klbelt's decode loop (LeanDecoder): None = where it can run the copy, True = required, False = never
        self.decoder = None  # the LeanDecoder over the copy, when used
        self.copy = None
        self._targets: dict[str, torch.Tensor] = {}  # plain name -> the copy's tensor (unpacked weights)
        self._packed: dict[str, list[tuple[PackedLinear, str]]] = {}  # plain name -> (packed layer, "weight"/"bias")
        self._moving: set[str] = set()

    def _pack_linears(self, rows_hint: int, frozen: dict[str, torch.Tensor]) -> None:
        """Swap every linear layer of the copy (on CPU) for a :class:`PackedLinear` of the same weight,
        and every embedding whose table the policy never trains for a :class:`CastEmbedding` of the policy's."""
        names = {id(p): n for n, p in self.copy.named_parameters()}  # tied tensors: their first name
        for name, module in list(self.copy.named_modules()):
            if type(module) is nn.Linear and module.weight.device.type == "cpu":
                packed = PackedLinear(module.weight, module.bias, rows_hint)
                self._packed.setdefault(names[id(module.weight)], []).append((packed, "weight"))
                if module.bias is not None:
                    self._packed.setdefault(names[id(module.bias)], []).append((packed, "bias"))
                owner, _, leaf = name.rpartition(".")
                setattr(self.copy.get_submodule(owner) if owner else self.copy, leaf, packed)
        for name, module in list(self.copy.named_modules()):
            key = names.get(id(getattr(module, "weight", None)))
            if type(module) is nn.Embedding and key in frozen and frozen[key].device.type == "cpu":
                owner, _, leaf = name.rpartition(".")
                setattr(self.copy.get_submodule(owner) if owner else self.copy, leaf, CastEmbedding(frozen[key], self.dtype))
        # a packed weight's plain tensor is dropped unless another module still reads it
        self._targets = {n: p for n, p in self.copy.named_parameters()}

    def _release(self) -> None:
        """Free the packed weights that the next refresh rewrites anyway (between rollouts they are dead memory)."""
        for name in self._moving:
            for layer, kind in self._packed.get(name, ()):
                if kind == "weight":
                    layer.packed = None

    def _build(self, policy, rows_hint: int = 16) -> None:
        hf = hf_model(policy)
        try:
            with torch.device("meta"):
                copy = type(hf)(hf.config)
        except Exception as exc:  # not a Hugging Face PreTrainedModel with a config
            raise ValueError(f"sampler 'bf16-merged' needs a Hugging Face causal LM; cannot rebuild {type(hf).__name__}: {exc}") from None
        device = next(hf.parameters()).device
        self._moving = _moving(policy)
        state, frozen = {}, {}
        for name, t in merged_tensors(policy):
            state[name] = t.detach().to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype, copy=True)
            if name not in self._moving and t.is_floating_point():
                frozen[name] = t  # the policy's own tensor
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
        self._packed = {}
        if self.pack:
            self._pack_linears(rows_hint, frozen)
        self.decoder = None
        if self.lean is not False:
            from .lean import LeanDecoder, unsupported

            on_cuda = device.type == "cuda"  # a GPU decodes through a static cache replayed as CUDA graphs
            reason = unsupported(self.copy, attention=None if on_cuda else KLBELT_FP32)
            if reason is None and on_cuda:
                from .graph import GraphDecoder

                self.decoder = GraphDecoder(self.copy)
            elif reason is None:
                self.decoder = LeanDecoder(self.copy)
            elif self.lean:
                raise ValueError(f"MergedCopySampler lean=True: klbelt's decode loop cannot run {type(self.copy).__name__}: {reason}")

    @torch.no_grad()
    def refresh(self, policy, rows_hint: int = 16) -> None:
        """Rewrite the copy's moving weights from the policy (the engine's weight sync)."""
        if self.copy is None:
            self._build(policy, rows_hint)
            return
        for name, tensor in merged_tensors(policy):
            if name not in self._moving:
                continue
            if name in self._targets:
                self._targets[name].copy_(tensor)
                tensor = self._targets[name]
            for layer, kind in self._packed.get(name, ()):
                layer.pack(tensor) if kind == "weight" else layer.set_bias(tensor)

    def __call__(self, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> Rollout:
        """Sync the copy from ``policy``, then :func:`~klbelt.rl.sampling.sample` from it (log-probs are the copy's)."""
        self.refresh(policy, rows_hint=prompt_ids.shape[0])
        try:
            if self.decoder is not None:
                self.decoder.reserve(kwargs.get("max_new_tokens", 0))
                return sample(self.decoder, prompt_ids, prompt_mask, **kwargs)
            return sample(self.copy, prompt_ids, prompt_mask, **kwargs)
        finally:
            self._release()

    def close(self) -> None:
        self.copy, self.decoder, self._targets, self._packed = None, None, {}, {}
