"""Sample estimators of KL(policy || ref) from the log-probs of sampled tokens."""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import _checks

ESTIMATORS = ("k1", "k2", "k3", "abs")
#: verl's ``kl_penalty`` names for the same estimators (verl 0.9.1 ``core_algos.kl_penalty``)
ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
#: every name ``kl_per_token`` accepts; a trailing ``+`` (verl's straight-through) keeps the
#: estimator's value and takes the gradient of k2
ESTIMATOR_NAMES = tuple(n + plus for plus in ("", "+") for n in ESTIMATORS + tuple(ESTIMATOR_ALIASES))
CLAMP_GRADIENTS = ("zero", "pass")


def check_log_ratio_clamp(log_ratio_clamp, clamp_gradient: str) -> float | None:
    """Validate the clamp arguments of :func:`kl_per_token`; return the clamp as a float (or None)."""
    _checks.choice("clamp_gradient", clamp_gradient, CLAMP_GRADIENTS)
    if log_ratio_clamp is None:
        return None
    if isinstance(log_ratio_clamp, bool) or not isinstance(log_ratio_clamp, Real):
        raise TypeError(f"log_ratio_clamp must be a finite number > 0 or None, got {type(log_ratio_clamp).__name__}")
    c = float(log_ratio_clamp)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"log_ratio_clamp must be a finite number > 0 or None, got {log_ratio_clamp!r}")
    return c


def kl_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    *,
    log_ratio_clamp: float | None = None,
    clamp_gradient: str = "zero",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
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

    Their derivatives in :math:`\ell` are k1: 1, k2: :math:`\ell`, k3:
    :math:`1 - e^{-\ell}`, abs: :math:`\mathrm{sign}(\ell)`; and
    :math:`\partial\ell/\partial` ``logprobs`` = 1, :math:`\partial\ell/\partial` ``ref_logprobs`` = -1.

    **Log-ratio clamp** (off by default; then nothing below applies and the
    result is bit-identical to the formulas above). With ``log_ratio_clamp=c``
    the estimator f is applied to :math:`\bar\ell = \min(\max(\ell, -c), c)`,
    so every value is bounded (k3 <= :math:`e^{c} - 1 + c` instead of
    overflowing fp32 for :math:`\ell < -88.7`). Values: :math:`f(\bar\ell)` in
    both modes. Gradients with respect to ``logprobs`` (negate for ``ref_logprobs``):

    * ``clamp_gradient="zero"`` (a plain ``torch.clamp``):
      :math:`f'(\ell)` where :math:`|\ell| \le c` (the boundary included) and
      exactly 0 where :math:`|\ell| > c`. Trade-off: the most-drifted tokens,
      the ones a KL loss most needs to pull back, stop being pulled back at
      all; the penalty sees them only through its (capped) value.
    * ``clamp_gradient="pass"`` (straight-through: the clamp's derivative is
      taken as 1): :math:`f'(\bar\ell)` everywhere, i.e. the estimator's
      derivative at the clamped value. Finite, and nonzero on drifted tokens
      (k1: 1; k2: :math:`\pm c`; k3: :math:`1 - e^{\mp c}`; abs: :math:`\pm 1`,
      the sign of :math:`\ell`), but it is no longer the derivative of the
      value returned.

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy (<= 0).
        ref_logprobs: same shape, under the reference.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``; verl's names
            ``"kl"`` (k1), ``"mse"`` (k2), ``"low_var_kl"`` (k3, without verl's clamp
            to [-10, 10]) are aliases, and any name with a trailing ``"+"`` (e.g.
            ``"k3+"``) returns the estimator's value with the gradient of k2
            (verl's straight-through: ``k2 - k2.detach() + value.detach()``).
        log_ratio_clamp: ``None`` (default, no clamp) or a finite ``c > 0``:
            the log-ratio is clamped to ``[-c, c]`` before the estimator.
        clamp_gradient: ``"zero"`` (default) or ``"pass"``: the gradient
            through the clamp, see above. Ignored without a clamp.
        weights: ``None`` (tokens drawn from the policy) or a tensor of the
            same shape of importance weights :math:`w = \pi/\mu` for tokens
            drawn from a sampler :math:`\mu` (see
            :func:`klbelt.kl.importance_weights`): the result is
            :math:`w \cdot f(\ell)`, whose mean under :math:`\mu` is the
            mean of :math:`f(\ell)` under the policy, so k1 and k3 stay
            unbiased for KL(pi||ref) (with untruncated weights). The weights are
            constants (detached). Do not also pass them to :func:`aggregate`.

    Returns:
        Tensor of the same shape (elementwise; masking is the caller's job,
        see :func:`aggregate`). Differentiable in both inputs.
    """
    _checks.tensor("logprobs", logprobs, floating=True)
    _checks.tensor("ref_logprobs", ref_logprobs, floating=True)
    _checks.same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    _checks.choice("estimator", estimator, ESTIMATOR_NAMES)
    if estimator.endswith("+"):
        kw = dict(log_ratio_clamp=log_ratio_clamp, clamp_gradient=clamp_gradient, weights=weights)
        value = kl_per_token(logprobs, ref_logprobs, estimator[:-1], **kw)
        k2 = kl_per_token(logprobs, ref_logprobs, "k2", **kw)
        return k2 - k2.detach() + value.detach()
    estimator = ESTIMATOR_ALIASES.get(estimator, estimator)
    _checks.logprob_values("logprobs", logprobs.detach())
    _checks.logprob_values("ref_logprobs", ref_logprobs.detach())
    clamp = check_log_ratio_clamp(log_ratio_clamp, clamp_gradient)
    if weights is not None:
        values = kl_per_token(logprobs, ref_logprobs, estimator, log_ratio_clamp=log_ratio_clamp, clamp_gradient=clamp_gradient)
        return values * check_weights("weights", weights, values)
    log_ratio = logprobs - ref_logprobs
    if clamp is not None:
        if clamp_gradient == "zero":
            log_ratio = log_ratio.clamp(-clamp, clamp)
        else:
            # value clamp(l) exactly (l - l is exactly 0 for finite l); derivative 1 through the clamp
            log_ratio = log_ratio.detach().clamp(-clamp, clamp) + (log_ratio - log_ratio.detach())
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # exp(-l) - 1 + l, with expm1 for accuracy when l is small
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()


def check_weights(name: str, weights, values: torch.Tensor) -> torch.Tensor:
    """Importance weights: a finite, >= 0 floating tensor of ``values``' shape; returned detached."""
    _checks.tensor(name, weights, floating=True)
    _checks.same_shape("values", values, name, weights)
    w = weights.detach()
    if w.numel():
        _checks.finite(name, w)
        _checks.require((w >= 0).all(), ValueError, f"{name} must be importance weights >= 0; got a negative value")
    return w
