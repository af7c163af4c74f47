"""Importance weighting: the trainer's correction for rollouts drawn by a sampler mu that is not the policy pi.

Real stacks sample with an inference engine (bf16 kernels, other batching) and
train in fp32: the tokens come from mu, not from the trained policy.
:class:`RolloutCorrection` recomputes pi's log-probs of the sampled tokens (they
become PPO's "old" log-probs), measures the mismatch (:func:`mismatch_metrics`)
and gives the importance weights pi/mu that the trainer puts on the advantages
and on the KL the controller sees. Who draws the rollouts is :mod:`klbelt.rl.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kl.mismatch import DEFAULT_BAND, importance_weights
from .distributed import World
from .precision import autocast
from .sampling.rollout import Rollout
from .scoring import response_logprobs

CORRECTIONS = ("off", "tis", "mis", "band")


@dataclass
class RolloutCorrection:
    """Recompute pi's log-probs of a rollout, measure the mismatch, give importance weights.

    ``correction``: ``"off"`` (no weights: pi's recomputed log-probs are used as
    they are, the KL is k1 of tokens drawn from mu), ``"tis"`` (token-level
    truncated IS, min(pi/mu, cap)), ``"mis"`` (sequence-level masked IS: a
    sequence whose ratio leaves (0, cap], or ``band``, gets weight 0) or
    ``"band"`` (token-level: weight pi/mu inside ``band``, 0 outside).
    """

    sampler: str = "policy"
    correction: str = "off"
    cap: float = 2.0
    band: tuple[float, float] | None = None
    world: World | None = None  # whose tokens the metrics cover; None: the default process group (World.current())
    filtered: bool = False  # top_k/top_p on: mu is the filtered distribution, never the policy itself
    fused: bool | None = None  # the fused head for pi's recomputed log-probs (None: klbelt.rl.scoring's default)

    @property
    def active(self) -> bool:
        # the plain policy sampler, unfiltered, with no correction is today's path, untouched
        return self.sampler != "policy" or self.correction != "off" or self.filtered

    def weights(self, trainer_logprobs, sampler_logprobs, mask):
        if self.correction == "tis":
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="token", mode="truncate", cap=self.cap)
        if self.correction == "mis":
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="sequence", mode="mask", cap=self.cap, band=self.band)
        if self.correction == "band":
            band = self.band or DEFAULT_BAND
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="token", mode="mask", cap=max(self.cap, band[1]), band=band)
        return None, None

    def __call__(self, policy, roll: Rollout, temperature: float, bf16: bool = False, trainer_logprobs=None):
        """``(old_logprobs [B, R], weights [B, R] or None, metrics dict)`` of one rollout.

        Inactive: the sampler's log-probs, no weights, no metrics. Active: pi's
        log-probs (``trainer_logprobs`` when the caller already has them from a
        forward with the current weights, else a no-grad forward with the trained
        passes' precision), the weights of ``correction`` and the mismatch
        metrics of the global batch (:func:`mismatch_metrics`: nats/token for
        ``mismatch_kl`` and ``mismatch_k3``, KL(mu || pi), reduced over the
        data-parallel ranks).
        """
        if not self.active:
            return roll.logprobs, None, {}
        mask = roll.response_mask
        if trainer_logprobs is None:
            with torch.no_grad(), autocast(mask.device, bf16):
                trainer_logprobs = response_logprobs(policy, roll, temperature, fused=self.fused)
        trainer_logprobs = trainer_logprobs.detach().float()
        weights, clipped = self.weights(trainer_logprobs, roll.logprobs, mask)
        world = self.world if self.world is not None else World.current()
        metrics = mismatch_metrics(trainer_logprobs, roll.logprobs, mask, weights, clipped, world)
        if roll.filtered_mass is not None:
            metrics["filtered_mass"] = filtered_mass(roll.filtered_mass, mask, world)
        return trainer_logprobs, weights, metrics


def filtered_mass(mass: torch.Tensor, mask: torch.Tensor, world: World) -> float:
    """``filtered_mass``: the mean over the global batch's valid tokens of the probability mass
    that top-k/top-p dropped from pi's distribution at each step (``mass`` ``[B, R]``, this rank's rows)."""
    sums = world.all_sum(torch.stack([(mass.double() * mask).sum(), mask.double().sum()]))
    total, n = sums.tolist()
    return total / n if n else 0.0


def mismatch_metrics(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None, clipped_frac: torch.Tensor | None, world: World) -> dict[str, float]:
    r"""The trainer's per-update mismatch metrics over the *global* batch (every rank's valid tokens).

    With :math:`\delta_t = \log\pi(y_t) - \log\mu(y_t)` at the N valid tokens of all ranks:
    ``mismatch_kl`` = :math:`\frac1N\sum -\delta_t` and ``mismatch_k3`` =
    :math:`\frac1N\sum (e^{\delta_t} - 1 - \delta_t)` (KL(mu || pi), nats/token, as
    :func:`klbelt.mismatch_stats`'s ``k1``/``k3``), ``mismatch_max_logratio`` =
    :math:`\max|\delta_t|` (nats), ``is_weight_mean/min/max`` over the valid tokens of the
    applied weights (the raw pi/mu when no correction), ``is_clipped_frac`` = truncated or
    zeroed tokens / N. Sums and counts are all-reduced, maxima and minima reduced with
    MAX/MIN, so N processes report what one process reports on the same global batch.
    ``[B, R]`` inputs are this rank's rows; ``weights``/``clipped_frac`` as
    :meth:`RolloutCorrection.weights` returns them (``None`` without a correction).
    """
    if weights is None:  # no correction: show the raw pi/mu (and check the inputs as importance_weights does)
        weights = importance_weights(trainer_logprobs, sampler_logprobs, mask, cap=1e30)[0]
    m = mask > 0
    delta = (trainer_logprobs.detach().double() - sampler_logprobs.detach().double())[m]
    shown = weights.detach().double()[m]
    n = float(m.sum())
    clipped = float(clipped_frac) * n if clipped_frac is not None else 0.0
    sums = torch.tensor([float((-delta).sum()), float((torch.expm1(delta) - delta).sum()), float(shown.sum()), clipped, n],
                        dtype=torch.float64, device=mask.device)
    inf = float("inf")
    # max|delta|, max w and -min w in one MAX reduction; -inf where this rank has no valid token
    peaks = torch.tensor([float(delta.abs().max()) if n else -inf, float(shown.max()) if n else -inf,
                          float(-shown.min()) if n else -inf], dtype=torch.float64, device=mask.device)
    if world.size > 1:
        import torch.distributed as dist

        sums = world.all_sum(sums)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=world.group)
    kl_sum, k3_sum, w_sum, clipped_sum, total = sums.tolist()
    max_delta, w_max, neg_w_min = peaks.tolist()
    if total == 0:  # no valid token anywhere: no mismatch to report
        return {"mismatch_kl": 0.0, "mismatch_k3": 0.0, "mismatch_max_logratio": 0.0, "is_weight_mean": 1.0,
                "is_weight_min": 1.0, "is_weight_max": 1.0, "is_clipped_frac": 0.0}
    return {
        "mismatch_kl": kl_sum / total,
        "mismatch_k3": k3_sum / total,
        "mismatch_max_logratio": max_delta,
        "is_weight_mean": w_sum / total,
        "is_weight_min": -neg_w_min,
        "is_weight_max": w_max,
        "is_clipped_frac": clipped_sum / total,
    }
