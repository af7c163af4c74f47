"""klbelt: the KL safety belt for RLHF.

Layer 1 (``klbelt.kl``): log-probs, KL estimators, exact KL, masked aggregation.
Layer 2 (``klbelt.shaping``): rewards shaped as ``r - beta * KL``.
Layer 3 (``klbelt.control``): KL controllers (fixed, adaptive step/proportional, PID) and rank-consistent input.
Layer 4 (``klbelt.monitor``): KLMonitor, health rules and alerts, sinks, readers, report.
"""

from importlib.metadata import PackageNotFoundError, version

from .kl import (
    DIRECTIONS,
    ESTIMATORS,
    MODES,
    aggregate,
    aggregate_many,
    importance_weights,
    kl_from_hidden,
    kl_from_logits,
    kl_per_token,
    logprobs_from_hidden,
    logprobs_from_logits,
    mismatch_stats,
)
from .shaping import ShapedRewards, compute_kl_penalty, compute_rewards_with_kl, shape_rewards
from .control import AdaptiveKLController, FixedKLController, PIDKLController, global_observed_kl
from .monitor import KLHealthWarning, KLMonitor, default_rules, diagnose, read_run

try:
    __version__ = version("klbelt")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "FixedKLController",
    "AdaptiveKLController",
    "PIDKLController",
    "global_observed_kl",
    "KLMonitor",
    "KLHealthWarning",
    "default_rules",
    "diagnose",
    "read_run",
    "logprobs_from_logits",
    "kl_per_token",
    "kl_from_logits",
    "logprobs_from_hidden",
    "kl_from_hidden",
    "aggregate",
    "aggregate_many",
    "mismatch_stats",
    "importance_weights",
    "compute_kl_penalty",
    "compute_rewards_with_kl",
    "shape_rewards",
    "ShapedRewards",
    "ESTIMATORS",
    "MODES",
    "DIRECTIONS",
    "__version__",
]
