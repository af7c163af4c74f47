"""Advantage estimators: GAE with a value head, and a critic-free group baseline.

:class:`Advantages` is the trainer's choice between them, made once per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kl import _checks
from ..kl.aggregate import aggregate


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    .. math::
        \delta_t = r_t + \gamma V_{t+1} - V_t, \qquad
        A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}, \qquad R_t = A_t + V_t

    where the episode ends after the last valid token of each row
    (:math:`V = 0` beyond it). Valid tokens must be contiguous within a row
    (left padding and early EOS are fine; a hole ends the episode there).

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. ``shape_rewards(...).rewards``).
        values: ``[B, T]`` value-head predictions for the same positions.
        mask: ``[B, T]`` 1 on response tokens.
        gamma: discount in [0, 1]; lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, detached, 0 where masked.
    """
    _checks.tensor("rewards", rewards, floating=True)
    _checks.tensor("values", values, floating=True)
    _checks.same_shape("rewards", rewards, "values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    m = _checks.mask_like("mask", mask, "rewards", rewards)
    for name, value in (("gamma", gamma), ("lam", lam)):
        value = _checks.scalar(name, value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    rewards, values = rewards.detach() * m, values.detach() * m
    _checks.finite("rewards", rewards)
    _checks.finite("values", values)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_valid = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_valid if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_valid * running
        advantages[:, t] = running * m[:, t]
    return advantages, (advantages + values) * m


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, group=None) -> torch.Tensor:
    """Normalise ``values`` to unit variance (and zero mean) over the valid tokens.

    With ``group``, the mean and variance are those of the valid tokens of all
    data-parallel ranks together (two all-reduces), as for one process holding
    the whole batch.
    """
    m = _checks.mask_like("mask", mask, "values", _checks.tensor("values", values, floating=True))
    mean = aggregate(values, m, "token-mean", group=group)
    var = aggregate((values - mean).square(), m, "token-mean", group=group)  # two passes: no cancellation
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _check_groups(scores: torch.Tensor, group_size: int) -> None:
    _checks.tensor("scores", scores, floating=True)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    _checks.finite("scores", scores)


def group_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""The mean score of each sample's group, :math:`\bar s_g`, one per sample ``[B]`` (prompt-major layout,
    as :func:`group_advantages`): the critic-free baseline."""
    _check_groups(scores, group_size)
    return scores.detach().reshape(-1, group_size).mean(-1, keepdim=True).expand(-1, group_size).reshape(-1)


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    r"""Critic-free advantages from several samples per prompt (GRPO / RLOO style).

    Scores are laid out prompt-major: ``scores[g * group_size + i]`` is sample i
    of prompt g. With the group mean :math:`\bar s_g` (:func:`group_baseline`):

    * ``scale="std"`` (GRPO): :math:`(s_i - \bar s_g) / (\mathrm{std}_g + \epsilon)`;
    * ``scale="none"`` (Dr. GRPO): :math:`s_i - \bar s_g`;
    * ``scale="loo"`` (RLOO): :math:`s_i - \frac{1}{n-1}\sum_{j \ne i} s_j`.

    Returns ``[B]`` advantages (one per sequence; broadcast over its tokens).
    """
    baseline = group_baseline(scores, group_size)  # checks scores and group_size
    _checks.choice("scale", scale, ("std", "none", "loo"))
    centred = (scores.detach() - baseline).reshape(-1, group_size)
    if scale == "std":
        out = centred / (scores.detach().reshape(-1, group_size).std(-1, unbiased=False, keepdim=True) + eps)
    elif scale == "none":
        out = centred
    else:
        out = centred * group_size / (group_size - 1)
    return out.reshape(-1)


def weigh(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``x * weights``, or ``x`` itself when the rollouts came from the trained policy (no weights)."""
    return x if weights is None else x * weights


@dataclass
class Advantages:
    """The advantage estimator, chosen once: GAE with the critic, or the group baseline."""

    kind: str  # "gae" or "group"
    gamma: float
    lam: float
    group_size: int
    whiten: bool
    group: object = None  # the process group (whitening is global over ranks)

    @classmethod
    def from_config(cls, cfg, group=None) -> "Advantages":
        return cls(cfg.advantage, cfg.gamma, cfg.lam, cfg.group_size, cfg.whiten_advantages, group)

    def __call__(self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
                 is_weights: torch.Tensor | None = None):
        """``(advantages, returns)``; returns is None without a critic. Weighted by pi/mu when given
        (w >= 0, so w * PPO's clipped term = PPO's term with advantage w * A)."""
        if self.kind == "gae":
            advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        else:
            # critic-free: reward-to-go minus the mean total return of the sample's group
            to_go = rewards.flip(-1).cumsum(-1).flip(-1)
            baseline = group_baseline(rewards.sum(-1), self.group_size)
            advantages, returns = (to_go - baseline[:, None]) * mask, None
        if self.whiten:
            advantages = whiten(advantages, mask, group=self.group)
        return weigh(advantages, is_weights), returns
