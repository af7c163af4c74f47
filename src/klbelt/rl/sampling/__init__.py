"""Who draws the rollouts: the sampler mu, chosen once per run (``TrainConfig.sampler``).

Every backend is a function (or callable object) with :func:`sample`'s signature,
``draw(policy, prompt_ids, prompt_mask, **SamplingParams, uniforms=...) -> Rollout``:

- ``"policy"``: :func:`sample`, the trained model's own forward with a KV cache (``policy.py``);
- ``"bf16"``: :func:`bf16_sample`, the same under bf16 autocast;
- ``"bf16-merged"``: :class:`~klbelt.rl.sampling.merged.MergedCopySampler`, a bf16 copy of the
  weights (LoRA merged in) rewritten before each rollout (``merged.py``), decoding through
  :class:`~klbelt.rl.sampling.lean.LeanDecoder` on a CPU or
  :class:`~klbelt.rl.sampling.graph.GraphDecoder` (CUDA graphs) on a GPU where they can run it;
- ``"vllm"``: :class:`~klbelt.rl.sampling.vllm.VLLMSampler`, vLLM in its own environment (``vllm.py``).

How the trainer corrects for a sampler that is not the policy is :mod:`klbelt.rl.importance`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .policy import bf16_sample, filter_logits, inverse_cdf, sample
from .rollout import Rollout, SamplingParams

SAMPLERS = ("policy", "bf16", "bf16-merged", "vllm")

__all__ = ["SAMPLERS", "make_sampler", "sample", "bf16_sample", "filter_logits", "inverse_cdf", "Rollout",
           "SamplingParams"]


def make_sampler(name: str, *, vllm_python: str | None = None) -> Callable[..., Rollout]:
    """The sampling function of ``TrainConfig.sampler``; same signature as :func:`sample`.

    ``"bf16-merged"``: a :class:`~klbelt.rl.sampling.merged.MergedCopySampler`, a bf16 copy of
    the policy (LoRA merged in) rewritten from it before each rollout.
    ``"vllm"``: a :class:`~klbelt.rl.sampling.vllm.VLLMSampler` whose worker runs
    in the vLLM environment's python (``vllm_python``, else ``$KLBELT_VLLM_PYTHON``).
    """
    if name == "policy":
        return sample
    if name == "bf16":
        return bf16_sample
    if name == "bf16-merged":
        from .merged import MergedCopySampler

        return MergedCopySampler(torch.bfloat16)
    if name == "vllm":
        from .vllm import VLLMSampler

        return VLLMSampler(vllm_python)
    raise ValueError(f"config sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {name!r}")
