"""Who draws the rollouts, and how the trainer corrects for a sampler that is not the policy.

Real stacks sample with an inference engine (bf16 kernels, other batching) and
train in fp32: the tokens come from a sampler mu, not from the trained policy
pi. ``make_sampler`` picks the sampler once per run; ``RolloutCorrection``
recomputes pi's log-probs of the sampled tokens (they become PPO's "old"
log-probs), measures the mismatch and gives the importance weights pi/mu that
the trainer puts on the advantages and on the KL the controller sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kl.mismatch import DEFAULT_BAND, importance_weights, mismatch_stats
from .lora import autocast
from .rollout import Rollout, response_logprobs, sample

SAMPLERS = ("policy", "bf16")
CORRECTIONS = ("off", "tis", "mis", "band")


def bf16_sample(policy, *args, **kwargs) -> Rollout:
    """:func:`klbelt.rl.rollout.sample` under bf16 autocast (KV cache and all): the same weights,
    other numerics. Its recorded log-probs are the bf16 sampler's (fp32 tensors of bf16 logits)."""
    device = next(policy.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return sample(policy, *args, **kwargs)


def make_sampler(name: str) -> Callable[..., Rollout]:
    """The sampling function of ``TrainConfig.sampler``; same signature as :func:`~klbelt.rl.rollout.sample`."""
    if name == "policy":
        return sample
    if name == "bf16":
        return bf16_sample
    raise ValueError(f"config sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {name!r}")


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

    @property
    def active(self) -> bool:
        # the plain policy sampler with no correction is today's path, untouched
        return self.sampler != "policy" or self.correction != "off"

    def weights(self, trainer_logprobs, sampler_logprobs, mask):
        if self.correction == "tis":
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="token", mode="truncate", cap=self.cap)
        if self.correction == "mis":
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="sequence", mode="mask", cap=self.cap, band=self.band)
        if self.correction == "band":
            band = self.band or DEFAULT_BAND
            return importance_weights(trainer_logprobs, sampler_logprobs, mask, level="token", mode="mask", cap=max(self.cap, band[1]), band=band)
        return None, None

    def __call__(self, policy, roll: Rollout, temperature: float, bf16: bool = False):
        """``(old_logprobs [B, R], weights [B, R] or None, metrics dict)`` of one rollout.

        Inactive: the sampler's log-probs, no weights, no metrics. Active: pi's
        log-probs from a no-grad forward (with the trained passes' precision),
        the weights of ``correction`` and the mismatch metrics (nats/token
        for ``mismatch_kl`` and ``mismatch_k3``, KL(mu || pi)).
        """
        if not self.active:
            return roll.logprobs, None, {}
        mask = roll.response_mask
        with torch.no_grad(), autocast(mask.device, bf16):
            trainer_logprobs = response_logprobs(policy, roll, temperature).float()
        stats = mismatch_stats(trainer_logprobs, roll.logprobs, mask)
        weights, clipped = self.weights(trainer_logprobs, roll.logprobs, mask)
        shown = weights if weights is not None else importance_weights(trainer_logprobs, roll.logprobs, mask, cap=1e30)[0]
        valid = shown[mask > 0]
        metrics = {
            "mismatch_kl": float(stats["k1"]),
            "mismatch_k3": float(stats["k3"]),
            "mismatch_max_logratio": float(stats["max_abs_log_ratio"]),
            "is_weight_mean": float(valid.mean()) if valid.numel() else 1.0,
            "is_weight_min": float(valid.min()) if valid.numel() else 1.0,
            "is_weight_max": float(valid.max()) if valid.numel() else 1.0,
            "is_clipped_frac": float(clipped) if clipped is not None else 0.0,
        }
        return trainer_logprobs, weights, metrics
