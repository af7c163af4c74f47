"""The article's two functions, same names, defaults and results, with checked inputs."""

from __future__ import annotations

import torch

from ..kl import _checks
from ..kl.estimators import kl_per_token


def compute_kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_coef: float = 0.1) -> torch.Tensor:
    r"""The article's batch KL penalty: :math:`\beta \cdot \mathrm{mean}(\log\pi - \log\pi_{ref})`.

    The mean of the k1 estimator over every element, times ``kl_coef`` (beta).
    Unit: nats per token times beta when the inputs are per-token log-probs.

    Args:
        logprobs: log-probs of the sampled tokens under the policy, any shape.
        ref_logprobs: same shape, under the frozen reference.
        kl_coef: beta >= 0 (the article's typical value 0.1).

    Returns:
        0-d tensor. Negative when the policy assigns lower probability than the
        reference to these tokens on average.
    """
    kl_coef = _checks.scalar("kl_coef", kl_coef, nonnegative=True)
    kl = kl_per_token(logprobs, ref_logprobs, "k1")
    if kl.numel() == 0:  # the mean of nothing is NaN: refuse rather than pass it on
        raise ValueError(f"logprobs must hold at least one log-probability, got shape {tuple(logprobs.shape)}")
    return kl_coef * kl.mean()


def compute_rewards_with_kl(
    rewards: torch.Tensor,
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kl_coef: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The article's elementwise shaping: total = r - beta * (log pi - log pi_ref).

    Args:
        rewards: raw scores, same shape as the log-probs.
        policy_logprobs: log-probs under the policy.
        ref_logprobs: log-probs under the frozen reference.
        kl_coef: beta >= 0.

    Returns:
        ``(total_rewards, kl)``: both of the inputs' shape; ``kl`` is the k1
        estimate per element (nats per token).
    """
    _checks.tensor("rewards", rewards, floating=True)
    kl = kl_per_token(policy_logprobs, ref_logprobs, "k1")
    _checks.same_shape("policy_logprobs", policy_logprobs, "rewards", rewards)
    _checks.finite("rewards", rewards)
    kl_coef = _checks.scalar("kl_coef", kl_coef, nonnegative=True)
    return rewards - kl_coef * kl, kl
