"""Sample estimators of KL(policy || ref) from the log-probs of sampled tokens."""

from __future__ import annotations

import torch

from . import _checks

ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    r"""Per-token sample estimate of KL(policy || ref), in nats per token.

    With the log-ratio :math:`\ell = \log \pi(y_t) - \log \pi_{ref}(y_t)` of a
    token :math:`y_t` sampled from the policy (Schulman, "Approximating KL
    divergence", 2020):

    * ``"k1"``: :math:`\ell`. Unbiased for KL(pi||ref); single values can be
      negative. Its gradient as a *loss* is zero in expectation; placed in the
      *reward* (with reward-to-go) its policy gradient is that of KL(pi||ref).
    * ``"k2"``: :math:`\ell^2 / 2`. Biased, >= 0. Used as a loss on-policy, its
      gradient equals the gradient of KL(pi||ref).
    * ``"k3"``: :math:`e^{-\ell} - 1 + \ell`. Unbiased for KL(pi||ref), >= 0.
      Used as a loss its gradient is that of the *forward* KL(ref||pi)
      (GRPO's choice).
    * ``"abs"``: :math:`|\ell|`. Biased, >= 0; a robust drift signal.

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy (<= 0).
        ref_logprobs: same shape, under the reference.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``.

    Returns:
        Tensor of the same shape (elementwise; masking is the caller's job,
        see :func:`aggregate`). Differentiable in both inputs.
    """
    _checks.tensor("logprobs", logprobs, floating=True)
    _checks.tensor("ref_logprobs", ref_logprobs, floating=True)
    _checks.same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    _checks.choice("estimator", estimator, ESTIMATORS)
    _checks.logprob_values("logprobs", logprobs.detach())
    _checks.logprob_values("ref_logprobs", ref_logprobs.detach())
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # exp(-l) - 1 + l, with expm1 for accuracy when l is small
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()
