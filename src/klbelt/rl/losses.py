"""PPO's clipped losses (Schulman et al. 2017), masked and aggregated with klbelt's modes, and where
the KL penalty goes: :class:`KLInReward` (PPO's, the article's) or :class:`KLInLoss` (GRPO's)."""

from __future__ import annotations

import torch

from dataclasses import dataclass

from ..kl import _checks, kl_per_token
from ..kl.aggregate import aggregate, aggregate_many
from .config import TrainConfig


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    mode: str = "token-mean",
    group=None,
) -> tuple[torch.Tensor, dict]:
    r"""Clipped surrogate: :math:`-\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon) A)`, :math:`\rho = e^{\log\pi - \log\pi_{old}}`.

    Returns ``(loss, stats)`` where stats holds the clip fraction and the
    approximate KL(old || new) (k3 of the ratio), both detached 0-d tensors.
    With ``group`` every mean is global over the data-parallel ranks (see
    :func:`klbelt.aggregate`): the loss and stats are those of the whole batch.
    """
    _checks.same_shape("logprobs", logprobs, "old_logprobs", old_logprobs)
    _checks.same_shape("logprobs", logprobs, "advantages", advantages)
    clip_range = _checks.scalar("clip_range", clip_range, positive=True)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * adv
    with torch.no_grad():
        clip_frac = (clipped < unclipped).to(ratio.dtype)
        approx_kl = torch.expm1(-log_ratio) + log_ratio
    # the loss and both statistics in one global reduction (one round trip, not three)
    loss, clip_frac, approx_kl = aggregate_many(
        [-torch.minimum(unclipped, clipped), clip_frac, approx_kl], mask, [mode, "token-mean", "token-mean"], group=group
    )
    return loss, {"clip_frac": clip_frac.detach(), "approx_kl": approx_kl.detach()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    mode: str = "token-mean",
    group=None,
) -> torch.Tensor:
    r"""Clipped value loss: :math:`\tfrac12 \max((V - R)^2, (V_{old} + \mathrm{clip}(V - V_{old}, \pm\epsilon) - R)^2)`.

    With ``group``, the mean is global over the data-parallel ranks.
    """
    _checks.same_shape("values", values, "old_values", old_values)
    _checks.same_shape("values", values, "returns", returns)
    clip_range = _checks.scalar("clip_range", clip_range, positive=True)
    old, target = old_values.detach(), returns.detach()
    clipped = old + (values - old).clamp(-clip_range, clip_range)
    return 0.5 * aggregate(torch.maximum((values - target).square(), (clipped - target).square()), mask, mode, group=group)


class KLInReward:
    """PPO's placement (the article's): ``-beta * k1`` on every token's reward; nothing in the loss."""

    def reward_coef(self, kl_coef: float) -> float:
        return kl_coef

    def loss_term(self, logprobs, ref_logprobs, mask, weights, kl_coef, group, old_logprobs=None):
        return None


@dataclass
class KLInLoss:
    r"""GRPO's placement: ``beta * mean(k2 or k3)`` over valid tokens added to the loss; the reward is ``r`` alone.

    ``ratio_correction`` (TRL's ``use_bias_correction_kl``): after the first minibatch the
    tokens come from pi_old, not pi_theta, so each token's KL is weighed by
    :math:`\rho = \pi_\theta/\pi_{old}`. k3: the differentiable :math:`\rho` (DeepSeek-V3.2):
    :math:`\nabla E_{\pi_{old}}[\rho\,k3] = \nabla \sum_x \pi_\theta(x) k3(x) = \nabla KL(\pi_\theta\|ref)`
    in every epoch (also the first, where plain k3 gives that of KL(ref || pi)). k2: the
    value of :math:`\rho` (no gradient through it):
    :math:`E_{\pi_{old}}[\rho\,\nabla k2] = \sum_x \pi_\theta(x) \log\frac{\pi_\theta}{ref}\nabla\log\pi_\theta = \nabla KL(\pi_\theta\|ref)`
    (a differentiable :math:`\rho` would add the gradient of :math:`E_{\pi_\theta}[k2]`, not a KL).
    """

    estimator: str
    log_ratio_clamp: float | None
    clamp_gradient: str
    ratio_correction: bool = False

    def reward_coef(self, kl_coef: float) -> float:
        return 0.0

    def loss_term(self, logprobs, ref_logprobs, mask, weights, kl_coef, group, old_logprobs=None):
        kl = kl_per_token(logprobs, ref_logprobs, self.estimator, log_ratio_clamp=self.log_ratio_clamp,
                          clamp_gradient=self.clamp_gradient, weights=weights)
        if self.ratio_correction and old_logprobs is not None:
            ratio = torch.exp((logprobs - old_logprobs.detach()) * mask)  # 1 on masked positions
            kl = kl * (ratio if self.estimator == "k3" else ratio.detach())
        return kl_coef * aggregate(kl, mask, "token-mean", group=group)


def kl_placement(cfg: TrainConfig) -> KLInReward | KLInLoss:
    """Where the run puts the KL penalty (``cfg.kl_in``)."""
    if cfg.kl_in == "reward":
        return KLInReward()
    return KLInLoss(cfg.kl_estimator, cfg.log_ratio_clamp, cfg.clamp_gradient, cfg.kl_ratio_correction)
