"""Decoding on a GPU: a static KV cache, each token's forward one CUDA graph replay.

On a GPU a small model's decode step is launch-bound: Hugging Face's forward for
one token of SmolLM2 launches several hundred kernels, each a few microseconds of
work after tens of microseconds of Python and launch overhead, and the GPU idles
between them. :class:`GraphDecoder` makes every decode step the same shapes (keys
and values of every layer in buffers of a fixed ``capacity``, written in place at
the step's position; attention over the whole capacity, positions not yet written
masked out), records that step once as a CUDA graph and replays it for every
further token: one launch per token instead of hundreds.

It calls the model's own pieces (embeddings, norms, projections, MLPs, rotary
module and its modeling file's ``apply_rotary_pos_emb``, as
:class:`~klbelt.rl.sampling.lean.LeanDecoder` does) with PyTorch's SDPA for the
attention. It is the ``bf16-merged`` sampler's decode loop on CUDA for the
Llama-family copies :func:`~klbelt.rl.sampling.lean.unsupported` accepts; the CPU
keeps its own path. Where CUDA graphs cannot run (see
:func:`~klbelt.rl.device.cuda_graphs_unavailable`, or a capture that fails) it
runs the same static step eagerly, after one warning naming why. Without graphs
the step runs on any device (the tests check it on the CPU against Hugging Face's
loop).

Like ``LeanDecoder`` it looks like a model to :func:`klbelt.rl.sampling.sample`:
``forward(input_ids, attention_mask, position_ids, use_cache, cache,
logits_to_keep)`` returns the logits of the kept positions and the cache.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..device import cuda_graphs_unavailable
from .lean import DecoderOutput, bind_modules, kept_logits, rotated_qkv

CAPACITY_STEP = 32  # capacities are rounded up to a multiple of this: prompts of other lengths reuse one graph
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"klbelt: the sampler decodes on CUDA without CUDA graphs (slower): {reason}", RuntimeWarning, stacklevel=3)


class StaticCache:
    """Keys and values ``[B, Hkv, capacity, D]`` per layer, the keys' padding mask ``[B, capacity]``, and the
    decode step's input buffers and CUDA graph (fixed addresses: a graph reads and writes exactly these)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        self.capacity, self.length = capacity, 0
        self.graph, self.logits = None, None

    def restart(self) -> "StaticCache":
        self.key_mask.zero_()
        self.length = 0
        return self


class GraphDecoder:
    """Static-cache decoding of a Llama-family Hugging Face model, one CUDA graph per decode step (module docstring).

    ``graphs``: ``None`` = where the device allows (CUDA), ``False`` = never (the same step run eagerly).
    ``reserve(n)`` before a rollout: the cache holds the prompt and ``n`` more tokens.
    """

    def __init__(self, model, graphs: bool | None = None):
        bind_modules(self, model, attention=None)
        self.device = next(model.parameters()).device
        self.caches: dict[tuple[int, int], StaticCache] = {}
        why = "graphs=False" if graphs is False else cuda_graphs_unavailable(self.device)
        self.why_no_graphs = why
        if why is not None and self.device.type == "cuda":
            _warn_once(why)

    @property
    def graphs(self) -> bool:
        return self.why_no_graphs is None

    def reserve(self, new_tokens: int) -> None:
        self.extra = int(new_tokens)

    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    def _cache_for(self, batch: int, length: int, dtype) -> StaticCache:
        capacity = -(-length // CAPACITY_STEP) * CAPACITY_STEP
        key = (batch, capacity)
        if key not in self.caches:
            self.caches[key] = StaticCache(len(self.layers), batch, self.kv_heads, capacity, self.head_dim, dtype, self.device)
        return self.caches[key].restart()

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, use_cache: bool = True, cache: StaticCache | None = None,
                logits_to_keep=None):
        B, T = input_ids.shape
        if cache is None:
            cache = self._cache_for(B, T + self.extra, self.embed.weight.dtype)
        start, end = cache.length, cache.length + T
        if end > cache.capacity:
            raise ValueError(f"GraphDecoder: {end} positions exceed the {cache.capacity} reserved (call reserve(new_tokens) first)")
        if attention_mask.shape != (B, end):
            raise ValueError(f"GraphDecoder: attention_mask must be [B, cached + new] = ({B}, {end}), got {tuple(attention_mask.shape)}")
        cache.key_mask[:, :end].copy_(attention_mask.bool())  # keys past `end` stay masked
        cache.length = end
        if T == 1:
            cache.ids.copy_(input_ids)
            cache.positions.copy_(position_ids)
            cache.write.fill_(start)
            return DecoderOutput(logits=self._decode_step(cache), cache=cache)
        write = torch.arange(start, end, device=input_ids.device)
        hidden = self._layers(input_ids, position_ids, write, cache)
        return DecoderOutput(logits=kept_logits(self, hidden, logits_to_keep), cache=cache)

    def _decode_step(self, cache: StaticCache) -> torch.Tensor:
        """One token's logits ``[B, 1, V]`` from the cache's input buffers: a graph replay, or the step run eagerly."""
        if self.graphs and cache.graph is None:
            self._capture(cache)
        if cache.graph is None:
            return self._step(cache)
        cache.graph.replay()
        return cache.logits.clone()  # the graph's output buffer is rewritten by the next replay

    def _step(self, cache: StaticCache) -> torch.Tensor:
        return self.head(self.norm(self._layers(cache.ids, cache.positions, cache.write, cache)))

    def _capture(self, cache: StaticCache) -> None:
        """Record the decode step on ``cache``'s buffers. Warm-up runs first on a side stream (as CUDA graphs need);
        they compute exactly the step about to run, so the keys and values they write are the step's own."""
        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                cache.logits = self._step(cache)
            cache.graph = graph
        except Exception as exc:  # e.g. an op that syncs with the host inside the model's modules
            cache.graph, cache.logits = None, None
            self.why_no_graphs = f"capturing the decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            _warn_once(self.why_no_graphs)

    def _layers(self, input_ids, position_ids, write: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """The decoder layers over ``T`` new positions written at ``write`` ``[T]``; the last hidden states ``[B, T, hidden]``."""
        B, T = input_ids.shape
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        slots = torch.arange(cache.capacity, device=hidden.device)
        # a new position sees the unpadded keys up to itself, and always itself (a left-padding position
        # then attends to something: some kernels return NaN for a softmax over nothing, NaN keys in the next layer)
        keep = cache.key_mask[:, None, None, :] & (slots <= write[:, None])
        keep = keep | (slots == write[:, None])
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = rotated_qkv(self, layer, hidden, cos, sin)
            keys, values = cache.keys[i], cache.values[i]
            keys.index_copy_(2, write, k.to(keys.dtype))
            values.index_copy_(2, write, v.to(values.dtype))
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=keep,
                                                 scale=attn.scaling, enable_gqa=H != Hkv)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden
