"""An exact testbed for KL-regularised optimisation and KL controllers (optimum in closed form)."""

from .testbed import (
    GRADIENTS,
    Optimum,
    SimResult,
    check_problem,
    exact_kl,
    kl_coef_for_target,
    max_kl,
    optimum,
    simulate,
)

__all__ = [
    "optimum",
    "Optimum",
    "max_kl",
    "kl_coef_for_target",
    "exact_kl",
    "simulate",
    "SimResult",
    "check_problem",
    "GRADIENTS",
]
