"""Advantage estimators: GAE with a value head, and a critic-free group baseline."""

from __future__ import annotations

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


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    r"""Critic-free advantages from several samples per prompt (GRPO / RLOO style).

    Scores are laid out prompt-major: ``scores[g * group_size + i]`` is sample i
    of prompt g. With the group mean :math:`\bar s_g`:

    * ``scale="std"`` (GRPO): :math:`(s_i - \bar s_g) / (\mathrm{std}_g + \epsilon)`;
    * ``scale="none"`` (Dr. GRPO): :math:`s_i - \bar s_g`;
    * ``scale="loo"`` (RLOO): :math:`s_i - \frac{1}{n-1}\sum_{j \ne i} s_j`.

    Returns ``[B]`` advantages (one per sequence; broadcast over its tokens).
    """
    _checks.tensor("scores", scores, floating=True)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    _checks.choice("scale", scale, ("std", "none", "loo"))
    _checks.finite("scores", scores)
    groups = scores.detach().reshape(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    if scale == "std":
        out = (groups - mean) / (groups.std(-1, unbiased=False, keepdim=True) + eps)
    elif scale == "none":
        out = groups - mean
    else:
        out = (groups - mean) * group_size / (group_size - 1)
    return out.reshape(-1)
