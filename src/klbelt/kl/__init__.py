"""Layer 1: the KL core. Pure tensor functions, no state."""

from ._kernels import get_backend, set_backend
from ._triton import head_backward_mode, set_head_backward, set_triton
from .aggregate import MODES, aggregate, aggregate_many
from .estimators import ESTIMATORS, kl_per_token
from .exact import DIRECTIONS, kl_from_logits
from .fused import kl_from_hidden, logprobs_from_hidden
from .logprobs import logprobs_from_logits
from .mismatch import importance_weights, mismatch_stats

__all__ = [
    "logprobs_from_logits",
    "kl_per_token",
    "kl_from_logits",
    "logprobs_from_hidden",
    "kl_from_hidden",
    "aggregate",
    "aggregate_many",
    "mismatch_stats",
    "importance_weights",
    "set_backend",
    "get_backend",
    "set_head_backward",
    "head_backward_mode",
    "set_triton",
    "ESTIMATORS",
    "MODES",
    "DIRECTIONS",
]
