r"""Sampler/trainer mismatch: tokens drawn from a sampler mu, trained under a policy pi.

Real stacks sample with an inference engine (vLLM, SGLang, bf16 kernels) and
train with another (FSDP, Megatron, fp32): the tokens come from :math:`\mu`,
not from the policy :math:`\pi` whose log-probs the trainer computes. With the
per-token log-ratio

.. math:: \delta_t = \log\pi(y_t) - \log\mu(y_t) \quad (y_t \sim \mu),

:func:`mismatch_stats` measures how far apart the two are, in the KL belt's
units (nats/token, nats/sequence), and :func:`importance_weights` gives the
weights :math:`w = \pi/\mu` (truncated, masked or banded) that turn
expectations under :math:`\mu` back into expectations under :math:`\pi`:
:math:`E_\mu[w f] = E_\pi[f]` for untruncated weights. Pass them as
``weights=`` to :func:`~klbelt.kl.kl_per_token` or :func:`~klbelt.kl.aggregate`
to get the KL to the reference, KL(pi || ref), from tokens drawn from mu.

Both functions treat their inputs as data (no gradients flow through them).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import _checks

LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
DEFAULT_BAND = (0.5, 2.0)


def _check_pair(trainer_logprobs, sampler_logprobs, mask) -> torch.Tensor:
    """Validate the two log-prob tensors and the mask; return the mask as a float64 tensor."""
    _checks.tensor("trainer_logprobs", trainer_logprobs, floating=True)
    _checks.tensor("sampler_logprobs", sampler_logprobs, floating=True)
    _checks.min_dim("trainer_logprobs", trainer_logprobs, 1, "[..., T]")
    _checks.same_shape("trainer_logprobs", trainer_logprobs, "sampler_logprobs", sampler_logprobs)
    m = _checks.mask_like("mask", mask, "trainer_logprobs", trainer_logprobs).detach().double()
    for name, x in (("trainer_logprobs", trainer_logprobs), ("sampler_logprobs", sampler_logprobs)):
        valid = torch.where(m > 0, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
        _checks.logprob_values(f"{name} (at valid mask positions)", valid)
    return m


def check_band(band, name: str = "band") -> tuple[float, float] | None:
    """``None`` or a pair ``(lo, hi)`` of weights with ``0 <= lo < 1 < hi < inf``; returned as floats."""
    if band is None:
        return None
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise TypeError(f"{name} must be None or a pair (lo, hi) of weights, got {band!r}")
    if any(isinstance(b, bool) or not isinstance(b, Real) for b in band):
        raise TypeError(f"{name} must hold two real numbers (lo, hi), got {band!r}")
    lo, hi = float(band[0]), float(band[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < 1 < hi):
        raise ValueError(f"{name} must satisfy 0 <= lo < 1 < hi < inf (a band must contain the weight 1, mu = pi), got {band!r}")
    return lo, hi


def check_cap(cap, name: str = "cap") -> float:
    """A finite cap > 1 on the importance weight (a cap <= 1 would down-weight on-policy tokens)."""
    if isinstance(cap, bool) or not isinstance(cap, Real):
        raise TypeError(f"{name} must be a finite number > 1, got {type(cap).__name__}")
    c = float(cap)
    if not (math.isfinite(c) and c > 1):
        raise ValueError(f"{name} must be a finite number > 1 (the weight pi/mu = 1 must pass unchanged), got {cap!r}")
    return c


def _log_ratio(trainer_logprobs, sampler_logprobs, m) -> torch.Tensor:
    """``log pi - log mu`` in float64, 0 at masked positions, detached."""
    delta = trainer_logprobs.detach().double() - sampler_logprobs.detach().double()
    return torch.where(m > 0, delta, torch.zeros((), dtype=torch.float64, device=delta.device))


def mismatch_stats(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    band: tuple[float, float] = DEFAULT_BAND,
) -> dict[str, torch.Tensor]:
    r"""How far the sampler mu is from the trained policy pi, in the KL belt's units.

    Tokens :math:`y_t` are drawn from :math:`\mu`; with
    :math:`\delta_t = \log\pi(y_t) - \log\mu(y_t)` at the valid tokens
    (:math:`N` of them, in :math:`S` non-empty sequences) and :math:`w_t = e^{\delta_t}`:

    * ``k1``: :math:`\frac1N\sum -\delta_t`, unbiased for KL(mu || pi), nats/token.
    * ``k3``: :math:`\frac1N\sum (e^{\delta_t} - 1 - \delta_t)`, unbiased for
      KL(mu || pi) and >= 0 per token, nats/token.
    * ``k1_seq``: :math:`\frac1S\sum_b\sum_t -\delta_{bt}`, KL(mu || pi) per
      response, nats/sequence.
    * ``max_abs_log_ratio``, ``p99_abs_log_ratio``: the largest and the 99th
      percentile of :math:`|\delta_t|` (nats): the tail that truncation acts on.
    * ``chi2``: :math:`\frac1N\sum w_t^2 - 1`, an estimate of the per-token
      chi-square divergence :math:`\chi^2(\pi\|\mu) = E_\mu[w^2] - 1`, the
      variance of the token-level importance weight (unitless).
    * ``log_ppl_ratio``: :math:`\frac1S\sum_b \frac{1}{n_b}\sum_t -\delta_{bt}`
      = mean over sequences of :math:`\log(\mathrm{PPL}_\pi / \mathrm{PPL}_\mu)`
      (nats/token; > 0 when the trainer finds the samples less likely).
    * ``frac_outside_band``: fraction of valid tokens with :math:`w_t` outside
      ``band`` = (lo, hi) (default (0.5, 2.0)).

    Args:
        trainer_logprobs: ``[..., T]`` log-probs of the sampled tokens under pi (the trainer's forward).
        sampler_logprobs: same shape, as reported by the sampler mu.
        mask: same shape, bool or 0/1; the valid response tokens.
        band: the weight band for ``frac_outside_band``.

    Returns:
        dict of detached 0-d float64 tensors (0 for an all-masked batch).
    """
    m = _check_pair(trainer_logprobs, sampler_logprobs, mask)
    lo, hi = check_band(band)
    delta = _log_ratio(trainer_logprobs, sampler_logprobs, m)
    n = m.sum().clamp_min(1)
    n_b = m.sum(-1)
    is_seq = (n_b > 0).double()
    n_seq = is_seq.sum().clamp_min(1)
    w = torch.exp(delta.clamp(max=700.0))  # float64: finite up to e^700
    abs_delta = delta.abs()
    valid_abs = abs_delta[m > 0]
    zero = torch.zeros((), dtype=torch.float64, device=delta.device)
    return {
        "k1": (-delta * m).sum() / n,
        "k3": ((torch.expm1(delta) - delta) * m).sum() / n,
        "k1_seq": (-(delta * m).sum(-1) * is_seq).sum() / n_seq,
        "max_abs_log_ratio": valid_abs.max() if valid_abs.numel() else zero,
        "p99_abs_log_ratio": torch.quantile(valid_abs, 0.99) if valid_abs.numel() else zero,
        "chi2": ((w.square() - 1) * m).sum() / n,
        "log_ppl_ratio": ((-(delta * m).sum(-1) / n_b.clamp_min(1)) * is_seq).sum() / n_seq,
        "frac_outside_band": (((w < lo) | (w > hi)).double() * m).sum() / n,
    }


def importance_weights(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    band: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Importance weights :math:`\pi/\mu` for tokens drawn from the sampler mu.

    The raw log-weight of a valid token, by ``level``:

    * ``"token"``: :math:`\log w_t = \delta_t = \log\pi(y_t) - \log\mu(y_t)`;
    * ``"sequence"``: :math:`\log w_b = \sum_t \delta_{bt}` (the exact
      sequence ratio), repeated on every token of the sequence;
    * ``"geometric"``: :math:`\log w_b = \frac{1}{n_b}\sum_t \delta_{bt}` (the
      geometric mean of the token ratios; length-independent), repeated.

    Then, by ``mode``:

    * ``"truncate"`` (TIS, Yao et al. 2025): :math:`\bar w = \min(w, c)`;
      with a ``band`` (lo, hi) as well, :math:`\bar w = 0` where :math:`w`
      lies outside it (token/sequence rejection).
    * ``"mask"`` (MIS): :math:`\bar w = w` inside the band and 0 outside; the
      band is ``band`` if given, else :math:`(0, c]`.

    Untruncated (:math:`c \to \infty`, no band) token weights give
    :math:`E_\mu[w f(y)] = E_\pi[f(y)]` for any f. Truncation's bias is
    :math:`E_\mu[\bar w f] - E_\pi[f] = -E_\mu[(w - c)_+ f]`, so
    :math:`|\text{bias}| \le \max|f| \sum_y (\pi(y) - c\,\mu(y))_+ \le \max|f|\,P_\pi(w > c)`;
    in exchange the weight, and so its variance, is bounded by c. The weights
    are data: no gradient flows through them (multiply a loss or an
    advantage by them).

    Args:
        trainer_logprobs: ``[..., T]`` log-probs of the sampled tokens under pi.
        sampler_logprobs: same shape, under the sampler mu.
        mask: same shape, bool or 0/1.
        level: ``"token"``, ``"sequence"`` or ``"geometric"``.
        mode: ``"truncate"`` or ``"mask"``.
        cap: c > 1, the truncation cap (``"truncate"``) or upper edge (``"mask"`` without a band).
        band: ``None`` or (lo, hi) with 0 <= lo < 1 < hi.

    Returns:
        ``(weights, clipped_frac)``: ``weights`` has the log-probs' shape and
        dtype (0 at masked positions; never above ``cap`` in truncate mode, nor
        above ``hi`` or ``cap`` in mask mode); ``clipped_frac`` is the 0-d
        fraction of valid tokens whose weight was truncated or zeroed.
    """
    m = _check_pair(trainer_logprobs, sampler_logprobs, mask)
    _checks.choice("level", level, LEVELS)
    _checks.choice("mode", mode, IS_MODES)
    c = check_cap(cap)
    lo_hi = check_band(band)
    delta = _log_ratio(trainer_logprobs, sampler_logprobs, m)
    if level == "token":
        log_w = delta
    else:
        per_seq = delta.sum(-1, keepdim=True)
        if level == "geometric":
            per_seq = per_seq / m.sum(-1, keepdim=True).clamp_min(1)
        log_w = per_seq.expand_as(delta)
    # decide in log space so a sequence ratio e^(sum) never overflows
    if mode == "truncate":
        rejected = torch.zeros_like(m, dtype=torch.bool)
        log_hi = math.log(c)
        if lo_hi is not None:
            lo, hi = lo_hi
            rejected = (log_w > math.log(hi)) | ((log_w < math.log(lo)) if lo > 0 else rejected)
        truncated = log_w > log_hi
        weights = torch.where(rejected, 0.0, torch.exp(log_w.clamp(max=log_hi)))
        changed = rejected | truncated
    else:
        lo, hi = lo_hi if lo_hi is not None else (0.0, c)
        outside = log_w > math.log(hi)
        if lo > 0:
            outside = outside | (log_w < math.log(lo))
        weights = torch.where(outside, 0.0, torch.exp(log_w.clamp(max=math.log(hi))))
        changed = outside
    weights = (weights * m).to(trainer_logprobs.dtype)
    clipped_frac = (changed.double() * m).sum() / m.sum().clamp_min(1)
    return weights, clipped_frac
