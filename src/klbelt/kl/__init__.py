"""Layer 1: the KL core. Pure tensor functions, no state."""

from ._kernels import get_backend, set_backend
from .aggregate import MODES, aggregate, aggregate_many
from .estimators import ESTIMATORS, kl_per_token
from .exact import DIRECTIONS, kl_from_logits
from .logprobs import logprobs_from_logits

__all__ = [
    "logprobs_from_logits",
    "kl_per_token",
    "kl_from_logits",
    "aggregate",
    "aggregate_many",
    "set_backend",
    "get_backend",
    "ESTIMATORS",
    "MODES",
    "DIRECTIONS",
]
