"""Per-token shaped rewards for PPO: -beta * KL on every token, the score on the last."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kl import _checks
from ..kl.estimators import kl_per_token


@dataclass
class ShapedRewards:
    """What :func:`shape_rewards` returns. All tensors, detached, on the inputs' device.

    Attributes:
        rewards: ``[B, T]`` per-token rewards; 0 on masked positions.
        kl: ``[B, T]`` per-token KL estimate (nats per token); 0 on masked positions.
        kl_mean: 0-d, mean KL per valid token (**nats per token**).
        kl_seq_mean: 0-d, mean over sequences of the per-sequence KL sum
            (**nats per sequence**); sequences with no valid token are not counted.
        kl_max: 0-d, largest per-token KL over valid tokens (nats per token).
        last_index: ``[B]`` int64, position that received the score (-1 for an
            all-masked row, whose score is dropped).
    """

    rewards: torch.Tensor
    kl: torch.Tensor
    kl_mean: torch.Tensor
    kl_seq_mean: torch.Tensor
    kl_max: torch.Tensor
    last_index: torch.Tensor


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row of a ``[B, T]`` 0/1 mask; -1 if none."""
    if mask.shape[-1] == 0:  # zero-length responses: every row is empty
        return torch.full(mask.shape[:-1], -1, dtype=torch.int64, device=mask.device)
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.to(torch.int64) * positions).amax(dim=-1) - 1


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef,
    estimator: str = "k1",
    *,
    log_ratio_clamp: float | None = None,
    clamp_gradient: str = "zero",
) -> ShapedRewards:
    r"""Shape sequence scores into per-token rewards with a KL penalty.

    .. math:: r_{bt} = -\beta\,\mathrm{KL}_{bt}\,m_{bt} + [t = t_b^{last}]\,s_b

    where :math:`\mathrm{KL}_{bt}` is ``estimator`` applied to the log-ratio of
    token t (see :func:`klbelt.kl_per_token`) and :math:`t_b^{last}` is the
    last valid position of row b. With ``"k1"`` and reward-to-go this is the
    PPO/RLHF objective whose policy gradient is that of
    :math:`E[s] - \beta\,KL(\pi \| \pi_{ref})`.

    Args:
        scores: ``[B]`` sequence scores from the reward model or function.
        logprobs: ``[B, T]`` policy log-probs of the sampled response tokens.
        ref_logprobs: ``[B, T]`` reference log-probs of the same tokens.
        mask: ``[B, T]`` bool or 0/1, 1 on response tokens (works with left
            padding and early EOS: only the positions of ones matter).
        kl_coef: beta >= 0 (float or 0-d tensor).
        estimator: ``"k1"`` (default), ``"k2"``, ``"k3"`` or ``"abs"``.
        log_ratio_clamp: ``None`` (default, off) or ``c > 0``: the per-token
            log-ratio is clamped to ``[-c, c]`` before the estimator, so each
            token's penalty is bounded (at most ``beta * c`` in size for k1):
            one drifted token cannot swamp the score. See :func:`klbelt.kl_per_token`.
        clamp_gradient: ``"zero"`` or ``"pass"``, passed to
            :func:`klbelt.kl_per_token`. The rewards are detached, so it does not
            change them; it is here for one signature across both functions.

    Returns:
        :class:`ShapedRewards`. Inputs are detached: rewards are constants for
        the policy gradient.
    """
    _checks.tensor("scores", scores, floating=True)
    _checks.tensor("logprobs", logprobs, floating=True)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be [B] = ({logprobs.shape[0]},) to match logprobs {tuple(logprobs.shape)}, got {tuple(scores.shape)}")
    _checks.tensor("ref_logprobs", ref_logprobs, floating=True)
    _checks.same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    m = _checks.mask_like("mask", mask, "logprobs", logprobs.detach())
    # Padding positions may hold anything (0, NaN, garbage): only valid tokens are read.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = kl_per_token(
        torch.where(m > 0, logprobs.detach(), zero), torch.where(m > 0, ref_logprobs.detach(), zero), estimator,
        log_ratio_clamp=log_ratio_clamp, clamp_gradient=clamp_gradient,
    )
    _checks.finite("scores", scores)
    kl_coef = _checks.scalar("kl_coef", kl_coef, nonnegative=True)
    if isinstance(kl_coef, torch.Tensor):
        kl_coef = kl_coef.detach().to(kl.device, kl.dtype)
    kl = kl * m
    rewards = -kl_coef * kl
    last = last_valid_index(m)
    has_tokens = last >= 0
    rows = torch.arange(kl.shape[0], device=kl.device)
    placed = torch.where(has_tokens, scores.detach().to(kl.dtype), torch.zeros((), dtype=kl.dtype, device=kl.device))
    if kl.shape[-1]:
        rewards[rows, last.clamp_min(0)] += placed
    n_tokens = m.sum()
    row_sum = kl.sum(-1)
    n_seqs = has_tokens.sum()
    neg_inf = torch.tensor(float("-inf"), dtype=kl.dtype, device=kl.device)
    kl_max = torch.where(m > 0, kl, neg_inf).amax() if kl.numel() else neg_inf
    return ShapedRewards(
        rewards=rewards,
        kl=kl,
        kl_mean=kl.sum() / n_tokens.clamp_min(1),
        kl_seq_mean=torch.where(has_tokens, row_sum, 0.0).sum() / n_seqs.clamp_min(1),
        kl_max=torch.where(n_tokens > 0, kl_max, torch.zeros((), dtype=kl.dtype, device=kl.device)),
        last_index=last,
    )
