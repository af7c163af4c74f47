"""PPO's clipped losses (Schulman et al. 2017), masked and aggregated with klbelt's modes."""

from __future__ import annotations

import torch

from ..kl import _checks
from ..kl.aggregate import aggregate, aggregate_many


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
