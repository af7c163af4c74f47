"""A lean KV-cached forward for the sampler copy of a Llama-family model (Llama, Mistral, Qwen2).

Hugging Face's forward, called once per generated token, spends most of a
small model's decode step outside the matrix products: building the 4D mask,
growing the cache by concatenation, and the Python of its module calls and
output bookkeeping. On SmolLM2 at 16 sequences the decode loop took 1.45 s for
24 tokens of which the linear layers were 0.63 s (``torch.profiler``; the
rest was Python and small ops). :class:`LeanDecoder` calls the model's own
pieces in the order its decoder layers do (its norms, projections, MLPs, rotary
module and modeling file's ``apply_rotary_pos_emb``, with klbelt's fp32
attention), over a cache allocated once per rollout and written in place. It is used by the
``bf16-merged`` sampler when the copy's attention is ``klbelt_fp32`` and its
architecture is one of the above; anything else samples through Hugging Face.

It looks like a model to :func:`klbelt.rl.sampling.sample`: ``forward(input_ids,
attention_mask, position_ids, use_cache, cache, logits_to_keep)`` returns the
logits of the kept positions and the cache.
"""

from __future__ import annotations

import sys

import torch

from .. import attention
from ..attention import KLBELT_FP32

ARCHITECTURES = ("llama", "mistral", "qwen2")


def unsupported(model, attention: str | None = KLBELT_FP32) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (a Hugging Face causal LM), or ``None`` when it can.

    ``attention``: the attention implementation the model must run (``None``: any; the
    :class:`~klbelt.rl.sampling.graph.GraphDecoder` brings its own)."""
    config = getattr(model, "config", None)
    if config is None:
        return "not a Hugging Face model"
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model_type {kind!r} is not one of {ARCHITECTURES}"
    if attention is not None and getattr(config, "_attn_implementation", None) != attention:
        return f"attention is {getattr(config, '_attn_implementation', None)!r}, not {attention!r}"
    if getattr(config, "use_sliding_window", False) or (kind == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    body = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, n) for n in needed) or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the model.{{{', '.join(needed)}}} and lm_head layout"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) \
                or not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            return f"{type(layer).__name__} is not a Llama decoder layer"
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return "query/key norms (not in Llama)"
    return None


class DecoderOutput(dict):
    """What ``sample`` reads of a model's output: ``logits`` and ``cache``."""

    @property
    def logits(self):
        return self["logits"]


class LeanCache:
    """Keys and values of every layer, ``[B, Hkv, capacity, D]`` each, filled up to ``length``."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity, self.length = capacity, 0


def bind_modules(decoder, model, attention: str | None) -> None:
    """Give ``decoder`` the Llama-family ``model``'s modules and shapes (a decoder's shared set-up).

    Sets ``model``, ``apply_rotary`` (the model's own module function), ``embed``, ``layers``, ``norm``,
    ``rotary``, ``head``, ``heads``, ``kv_heads``, ``head_dim`` and ``extra`` (tokens reserved, 0).
    Raises ``ValueError`` naming the decoder when :func:`unsupported` gives a reason.
    """
    reason = unsupported(model, attention=attention)
    if reason is not None:
        raise ValueError(f"{type(decoder).__name__} cannot run {type(model).__name__}: {reason}")
    decoder.model = model
    decoder.apply_rotary = sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb
    body = model.model
    decoder.embed, decoder.layers, decoder.norm = body.embed_tokens, list(body.layers), body.norm
    decoder.rotary, decoder.head = body.rotary_emb, model.lm_head
    config = model.config
    decoder.heads, decoder.kv_heads = config.num_attention_heads, config.num_key_value_heads
    decoder.head_dim = getattr(config, "head_dim", None) or config.hidden_size // decoder.heads
    decoder.extra = 0


def rotated_qkv(decoder, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(q, k, v)`` of one decoder ``layer`` over ``hidden`` ``[B, T, hidden size]``: its input norm, projections
    and rotary embedding as its own forward runs them; ``[B, heads, T, D]`` (keys and values: kv heads)."""
    B, T = hidden.shape[:2]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(B, T, decoder.heads, decoder.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, decoder.kv_heads, decoder.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, decoder.kv_heads, decoder.head_dim).transpose(1, 2)
    return (*decoder.apply_rotary(q, k, cos, sin), v)


def kept_logits(decoder, hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The LM head (after the final norm) on the positions ``logits_to_keep`` names, as Hugging Face reads it:
    ``None`` or 0 all, an int the last ones, a tensor those indices."""
    if logits_to_keep is None:
        kept = hidden
    elif isinstance(logits_to_keep, torch.Tensor):
        kept = hidden[:, logits_to_keep]
    else:
        kept = hidden[:, -int(logits_to_keep):] if logits_to_keep else hidden
    return decoder.head(decoder.norm(kept))


class LeanDecoder:
    """KV-cached forward of a Llama-family Hugging Face model's modules (see the module's docstring).

    ``reserve(n)`` before a rollout: the cache holds the prompt and ``n`` more tokens.
    """

    def __init__(self, model):
        bind_modules(self, model, KLBELT_FP32)

    def reserve(self, new_tokens: int) -> None:
        self.extra = int(new_tokens)

    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, use_cache: bool = True, cache: LeanCache | None = None,
                logits_to_keep=None):
        B, T = input_ids.shape
        hidden = self.embed(input_ids)
        if cache is None:
            cache = LeanCache(len(self.layers), B, self.kv_heads, T + self.extra, self.head_dim, hidden.dtype, hidden.device)
        start, end = cache.length, cache.length + T
        if end > cache.capacity:
            raise ValueError(f"LeanDecoder: {end} positions exceed the {cache.capacity} reserved (call reserve(new_tokens) first)")
        if attention_mask.shape != (B, end):
            raise ValueError(f"LeanDecoder: attention_mask must be [B, cached + new] = ({B}, {end}), got {tuple(attention_mask.shape)}")
        # additive mask [B, 1, T, end]: padded keys, and (over the new tokens) later keys, get the dtype's minimum
        keep = attention_mask.bool()[:, None, None, :].expand(B, 1, T, end)
        if T > 1:
            causal = torch.ones(T, end, dtype=torch.bool, device=hidden.device).tril(start)
            keep = keep & causal
        mask = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device).masked_fill_(~keep, torch.finfo(torch.float32).min)
        cos, sin = self.rotary(hidden, position_ids)
        H, D = self.heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = rotated_qkv(self, layer, hidden, cos, sin)
            keys, values = cache.keys[i], cache.values[i]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            out, _ = attention.fp32_attention(attn, q, keys[:, :, :end], values[:, :, :end], mask, scaling=attn.scaling)  # looked up per call: tests count its calls
            hidden = hidden + attn.o_proj(out.reshape(B, T, H * D))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        cache.length = end
        return DecoderOutput(logits=kept_logits(self, hidden, logits_to_keep), cache=cache)
