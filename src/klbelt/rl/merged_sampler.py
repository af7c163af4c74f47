"""Old path of :mod:`klbelt.rl.sampling.merged` (sampler ``"bf16-merged"``); it keeps working."""

from .sampling.merged import CastEmbedding, MergedCopySampler, PackedLinear, merged_tensors, packing_available  # noqa: F401
