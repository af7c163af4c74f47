"""A noisy plant with the English demo's dynamics, to tune a KL controller before spending demo runs.

The plant is the exact testbed (:func:`klbelt.sim.testbed.simulate`) driven
the way an RLHF trainer is: each update draws ``observe_samples`` tokens
from the policy as it is, feeds their mean k1 to the controller (so the first
observation sees KL 0, as the demo's does), then takes one Adam step on a
policy gradient from ``batch_size`` samples with k1 in the reward.

``DEMO_PLANT``'s numbers were chosen to match what ``klbelt demo`` and
``klbelt sweep --model smollm2`` measured on SmolLM2 (docs/controller.md):
with beta 0 the KL reaches about 0.2 nats/token by update 10; after 24
fixed-beta updates, beta 0.01 gives about 0.77, beta 0.1 about 0.09 and
beta 1.0 about 0.02 (the sweep: 0.75-0.79, 0.06-0.16, 0.003-0.07); and the
observed KL's noise relative to the true KL matches the demo's own
(``observe_samples``, measured from the per-token KL of demo runs).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from .testbed import simulate


@dataclass(frozen=True)
class Plant:
    """A testbed problem and the trainer-like loop around it (one Adam step per controller update)."""

    n_responses: int = 64
    reward_scale: float = 0.04  # sd of the responses' rewards (around +0.1)
    problem_seed: int = 123
    lr: float = 0.15
    batch_size: int = 16  # gradient samples per update (the demo's 16 continuations)
    observe_samples: int = 384  # tokens behind each KL observation (the demo's 16 x 24)
    observe_estimator: str = "k1"  # what the controller is fed: the mean k1 (the logged kl) or k3
    steps: int = 36

    def problem(self) -> tuple[list[float], list[float]]:
        """(reference probabilities, rewards): a random reference and rewards of sd ``reward_scale``."""
        g = torch.Generator().manual_seed(self.problem_seed)
        ref = torch.softmax(torch.randn(self.n_responses, generator=g, dtype=torch.float64), 0)
        reward = (torch.randn(self.n_responses, generator=g, dtype=torch.float64) * self.reward_scale + 0.1).clamp(-1, 1)
        return ref.tolist(), reward.tolist()

    def run(self, controller, seed: int = 0):
        """One run: a :class:`klbelt.sim.testbed.SimResult` (``observed_kl`` is what the controller saw)."""
        ref, reward = self.problem()
        return simulate(ref, reward, controller, steps=self.steps, inner_steps=1, gradient="sampled",
                        batch_size=self.batch_size, lr=self.lr, seed=seed, observe_samples=self.observe_samples,
                        observe_estimator=self.observe_estimator)


DEMO_PLANT = Plant()


@dataclass
class DemoCriteria:
    """The demo's story in numbers, for one run (KL in nats/token; the demo's criteria in brackets).

    * ``second_half_kl``: mean observed KL over the second half of the updates [within +-20% of the target];
    * ``min_early_beta``: the smallest beta of the first 5 updates [> 0: beta is not sent to 0 at the start];
    * ``late_peak``: after update ``settle_after``, the largest 3-update mean of the observed KL over the
      target [<= 1.5: no overshoot past 50%];
    * ``tail_in_band``: fraction of the last quarter whose 3-update mean lies within +-20% of the target.
    """

    second_half_kl: float
    min_early_beta: float
    late_peak: float
    tail_in_band: float
    passed: dict = field(default_factory=dict)


def _moving_mean(xs: list[float], n: int = 3) -> list[float]:
    return [statistics.fmean(xs[max(0, i - n + 1): i + 1]) for i in range(len(xs))]


def demo_criteria(observed_kl: list[float], kl_coef: list[float], target_kl: float, *, init_kl_coef: float,
                  settle_after: int = 8, band: float = 0.2) -> DemoCriteria:
    """Score a KL/beta trajectory (one entry per update) against the demo's criteria.

    ``kl_coef[k]`` is beta *during* update k (``init_kl_coef`` for the first), as the trainer logs it.
    """
    n = len(observed_kl)
    if n < 2 * settle_after or len(kl_coef) != n:
        raise ValueError(f"need matching series of at least {2 * settle_after} updates, got {n} and {len(kl_coef)}")
    half = statistics.fmean(observed_kl[n // 2:])
    smooth = _moving_mean(observed_kl)
    peak = max(smooth[settle_after:]) / target_kl
    tail = smooth[n - max(1, n // 4):]
    in_band = sum(abs(k / target_kl - 1) <= band for k in tail) / len(tail)
    min_beta = min(kl_coef[:5])
    crit = DemoCriteria(half, min_beta, peak, in_band)
    crit.passed = {"second_half_kl": abs(half / target_kl - 1) <= band, "min_early_beta": min_beta > 0,
                   "late_peak": peak <= 1.5}
    return crit


def run_seeds(make_controller, seeds, plant: Plant = DEMO_PLANT) -> list[dict]:
    """Run the plant once per seed with a fresh controller from ``make_controller()``; score each run.

    Returns one dict per seed: the criteria, and the trajectories (observed and exact KL, beta during each update).
    """
    rows = []
    for seed in seeds:
        controller = make_controller()
        init = float(controller.kl_coef)
        res = plant.run(controller, seed)
        during = [init] + res.kl_coef[:-1]  # beta used by update k (the result holds beta after update k)
        crit = demo_criteria(res.observed_kl, during, controller.target_kl, init_kl_coef=init)
        rows.append({"seed": seed, **asdict(crit), "observed_kl": res.observed_kl, "kl": res.kl, "kl_coef": during})
    return rows
