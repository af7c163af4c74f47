"""Layer 3: KL controllers (the rule that sets beta) and their rank-consistent input."""

from .controllers import RULES, UNITS, AdaptiveKLController, FixedKLController, PIDKLController
from .distributed import global_observed_kl

__all__ = [
    "FixedKLController",
    "AdaptiveKLController",
    "PIDKLController",
    "global_observed_kl",
    "UNITS",
    "RULES",
]
