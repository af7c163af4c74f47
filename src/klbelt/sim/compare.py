"""Step response of KL controllers in the testbed: settling, overshoot, steady-state error.

Definitions (``kl`` a KL series, one value per controller update, ``K*`` the target):

* **settling step**: the first update index (1-based) after which every later
  value stays within ``tolerance`` (10%) of K*; ``None`` (never settled) if
  that final run inside the band is shorter than the last quarter of the run
  (a series that merely ends inside the band has not settled);
* **overshoot**: after the first update at which the KL reaches K*, the largest
  ``(kl - K*) / K*`` (0 if it never goes above; ``None`` if it never reaches
  K*);
* **steady-state error**: mean of ``|kl - K*| / K*`` over the last quarter of
  the run; **tail in band**: the fraction of that last quarter within the band.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..control.controllers import AdaptiveKLController, PIDKLController
from .testbed import kl_coef_for_target, optimum, simulate

# The comparison's problem: 8 responses, the reference prefers low-reward ones
# (as a pretrained model prefers ordinary text to what a reward model loves).
DEFAULT_REF = tuple(float(x) for x in np.arange(8, 0, -1) / 36.0)
DEFAULT_REWARD = tuple(float(x) for x in np.linspace(0.0, 1.0, 8))


@dataclass
class StepResponse:
    settling_step: int | None
    overshoot: float | None
    steady_state_error: float
    tail_in_band: float  # fraction of the last quarter within the tolerance band


def step_response(kl, target_kl: float, tolerance: float = 0.1, tail_fraction: float = 0.25) -> StepResponse:
    """Settling step, overshoot and steady-state error of a KL series (see the module docstring)."""
    kl = np.asarray(kl, dtype=float)
    if kl.ndim != 1 or kl.size == 0:
        raise ValueError(f"kl must be a non-empty 1-d series, got shape {kl.shape}")
    rel = (kl - target_kl) / target_kl
    inside = np.abs(rel) <= tolerance
    n_tail = max(1, int(math.ceil(tail_fraction * kl.size)))
    outside = np.flatnonzero(~inside)
    first_of_final_run = int(outside[-1] + 1) if outside.size else 0  # 0-based
    settling = first_of_final_run + 1 if kl.size - first_of_final_run >= n_tail else None
    reached = np.flatnonzero(kl >= target_kl)
    overshoot = None if reached.size == 0 else float(max(0.0, rel[reached[0]:].max()))
    tail = slice(kl.size - n_tail, None)
    return StepResponse(settling, overshoot, float(np.abs(rel[tail]).mean()), float(inside[tail].mean()))


def default_controllers(target_kl: float, init_kl_coef: float = 0.1, horizon: float = 10000) -> dict:
    """The three adaptive controllers of the comparison, all starting from the same beta."""
    return {
        "step": AdaptiveKLController(init_kl_coef, target_kl, horizon, rule="step"),
        "proportional": AdaptiveKLController(init_kl_coef, target_kl, horizon, rule="proportional"),
        "pid": PIDKLController(init_kl_coef, target_kl, kp=0.05, ki=0.02, kd=1.0, smoothing=0.8),
    }


def compare_controllers(
    ref_probs=DEFAULT_REF,
    reward=DEFAULT_REWARD,
    target_kl: float = 0.5,
    *,
    init_kl_coef: float = 0.1,
    horizon: float = 10000,
    steps: int = 300,
    inner_steps: int = 5,
    batch_size: int = 256,
    lr: float = 0.02,
    seed: int = 0,
    tolerance: float = 0.1,
    controllers: dict | None = None,
) -> dict:
    """Run each controller in the testbed with sampled gradients; return metrics and trajectories.

    The metrics are computed on the exact KL of the policy (what the
    controller is meant to hold) and, separately, on the noisy observed KL
    the controller was fed.
    """
    beta_star = kl_coef_for_target(ref_probs, reward, target_kl)
    controllers = default_controllers(target_kl, init_kl_coef, horizon) if controllers is None else controllers
    runs = {}
    for name, controller in controllers.items():
        res = simulate(
            ref_probs, reward, controller, steps=steps, inner_steps=inner_steps, gradient="sampled",
            batch_size=batch_size, lr=lr, seed=seed,
        )
        noise = np.asarray(res.observed_kl) - np.asarray(res.kl)
        runs[name] = {
            "controller": controller.state_dict()["config"],
            "exact": asdict(step_response(res.kl, target_kl, tolerance)),
            "observed": asdict(step_response(res.observed_kl, target_kl, tolerance)),
            "observation_noise_std": float(noise.std()),
            "final_kl_coef": res.kl_coef[-1],
            "kl": res.kl,
            "observed_kl": res.observed_kl,
            "kl_coef": res.kl_coef,
        }
    return {
        "target_kl": target_kl,
        "unit": "nats per response (= per token: one-token responses)",
        "kl_coef_for_target": beta_star,
        "closed_form_kl_at_init_coef": optimum(ref_probs, reward, init_kl_coef).kl,
        "settings": {
            "ref_probs": list(ref_probs), "reward": list(reward), "init_kl_coef": init_kl_coef, "horizon": horizon,
            "steps": steps, "inner_steps": inner_steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "tolerance": tolerance, "gradient": "sampled", "estimator": "k1", "kl_in": "reward",
            "optimizer": "adam",
        },
        "runs": runs,
    }
