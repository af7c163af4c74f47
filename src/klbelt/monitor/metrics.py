"""Per-step KL statistics computed on the tensors' device and moved to the host once.

Every metric name says its unit (docs/design.md, "Units, written down once"):
names starting ``kl`` without ``_seq`` are **nats per token**; names with
``_seq`` are **nats per sequence** (the sum over a response's valid tokens).
"""

from __future__ import annotations

import math

import torch

from ..kl import _checks
from ..kl.exact import kl_from_logits

#: metric name -> (unit, meaning). What :class:`KLMonitor` writes and the readers map to.
METRICS: dict[str, tuple[str, str]] = {
    "step": ("step", "optimisation step"),
    "kl": ("nats/token", "mean over valid tokens of the per-token KL estimate"),
    "kl_max": ("nats/token", "largest per-token KL estimate in the batch"),
    "kl_min": ("nats/token", "smallest per-token KL estimate (k1 can be < 0 per token)"),
    "kl_p50": ("nats/token", "median per-token KL estimate"),
    "kl_p90": ("nats/token", "90th percentile of the per-token KL estimate"),
    "kl_p99": ("nats/token", "99th percentile of the per-token KL estimate"),
    "kl_neg_frac": ("fraction", "share of valid tokens whose KL estimate is < 0"),
    "kl_seq": ("nats/sequence", "mean over sequences of the per-sequence KL sum"),
    "kl_seq_max": ("nats/sequence", "largest per-sequence KL sum"),
    "kl_exact": ("nats/token", "mean over valid tokens of the exact KL(policy||ref) from logits"),
    "kl_exact_max": ("nats/token", "largest exact per-token KL"),
    "kl_est_gap": ("nats/token", "kl - kl_exact: bias + noise of the sample estimate this step"),
    "kl_coef": ("reward/nat", "beta, the KL penalty coefficient"),
    "reward": ("reward", "mean proxy (reward-model) score per sequence"),
    "gold_reward": ("reward", "mean gold (held-out) score per sequence"),
    "entropy": ("nats/token", "mean policy entropy per valid token"),
    "entropy_seq": ("nats/sequence", "policy entropy summed over a response (TRL's objective/entropy)"),
    "rlhf_reward": ("reward", "score - beta * KL summed over a response"),
    "distinct_2": ("fraction", "distinct bigrams / bigrams in the batch's responses"),
    "exclaim_rate": ("per 100 chars", "'!' marks per 100 characters of the batch's responses (the demo's hackable proxy)"),
    "tokens": ("tokens", "valid tokens in the batch"),
    "response_len": ("tokens", "mean valid tokens per sequence"),
    "kl_hist": ("counts", "valid tokens per bin of KL_HIST_EDGES (nats/token)"),
    # sampler mu vs trained policy pi (klbelt.kl.mismatch), tokens drawn from mu
    "mismatch_kl": ("nats/token", "k1 estimate of KL(sampler || policy): mean of log mu - log pi"),
    "mismatch_k3": ("nats/token", "k3 estimate of KL(sampler || policy), >= 0 per token"),
    "mismatch_max_logratio": ("nats", "largest |log pi - log mu| over valid tokens"),
    "mismatch_abs_logratio_mean": ("nats", "mean |log pi - log mu| over valid tokens (TRL's sampling_logp_difference)"),
    "mismatch_chi2": ("unitless", "E_mu[(pi/mu)^2] - 1 per token, the IS weight's variance"),
    "mismatch_log_ppl_abs_diff": ("nats/token", "|log PPL(policy) - log PPL(sampler)| (verl's log_ppl_abs_diff)"),
    "is_weight_mean": ("ratio", "mean importance weight pi/mu over valid tokens, after truncation/masking"),
    "is_weight_min": ("ratio", "smallest importance weight"),
    "is_weight_max": ("ratio", "largest importance weight"),
    "is_clipped_frac": ("fraction", "share of valid tokens whose weight was truncated or zeroed"),
}

_DECADES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]
#: bin edges (nats/token) of the per-token KL histogram ``kl_hist``: signed,
#: log-spaced; bin i holds values in [edges[i-1], edges[i]), the outer bins are open.
KL_HIST_EDGES: tuple[float, ...] = tuple([-e for e in reversed(_DECADES)] + _DECADES)
_QUANTILES = (0.5, 0.9, 0.99)


def _as_2d(name: str, x: torch.Tensor) -> torch.Tensor:
    _checks.min_dim(name, x, 1, "[B, T] or [T]")
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _masked_quantiles(vals: torch.Tensor, valid: torch.Tensor, n: torch.Tensor, qs) -> torch.Tensor:
    """Linear-interpolated quantiles (as torch.quantile) of ``vals[valid]`` without a host sync."""
    inf = torch.tensor(float("inf"), dtype=vals.dtype, device=vals.device)
    ordered = torch.sort(torch.where(valid, vals, inf)).values
    q = torch.tensor(qs, dtype=vals.dtype, device=vals.device)
    pos = q * (n - 1).clamp_min(0)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(vals.dtype)
    out = ordered[lo] + frac * (ordered[hi] - ordered[lo])
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def token_stats(kl: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Statistics of per-token KL values over the valid tokens, as 0-d / 1-d tensors on ``kl``'s device.

    Args:
        kl: ``[B, T]`` (or ``[T]``) per-token KL, nats/token.
        mask: same shape, bool or 0/1; ``None`` means every token is valid.

    Returns:
        ``kl, kl_max, kl_min, kl_p50, kl_p90, kl_p99, kl_neg_frac, kl_seq, kl_seq_max,
        tokens, response_len`` (0-d) and ``kl_hist`` (1-d counts over :data:`KL_HIST_EDGES`).
        Statistics of an empty selection are NaN.
    """
    _checks.tensor("kl", kl, floating=True)
    if mask is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    m = _checks.mask_like("mask", mask, "kl", kl) > 0
    vals = _as_2d("kl", kl.detach().float())
    m = m.reshape(vals.shape)
    _checks.finite("kl (at valid mask positions)", torch.where(m, vals, 0.0))
    nan = torch.tensor(float("nan"), device=vals.device)
    mf = m.float()
    n = mf.sum()
    masked = vals * mf
    row_sum = masked.sum(-1)
    is_seq = m.any(-1)
    n_seq = is_seq.float().sum()
    flat, valid = vals.reshape(-1), m.reshape(-1)
    edges = torch.tensor(KL_HIST_EDGES, device=vals.device)
    bins = torch.bucketize(flat, edges, right=True)
    hist = torch.zeros(len(KL_HIST_EDGES) + 1, device=vals.device).index_add_(0, bins, valid.float())
    p50, p90, p99 = _masked_quantiles(flat, valid, n, _QUANTILES).unbind()

    def guard(x, count):
        return torch.where(count > 0, x, nan)

    return {
        "kl": guard(masked.sum() / n.clamp_min(1), n),
        "kl_max": guard(torch.where(m, vals, -torch.inf).amax(), n),
        "kl_min": guard(torch.where(m, vals, torch.inf).amin(), n),
        "kl_p50": p50,
        "kl_p90": p90,
        "kl_p99": p99,
        "kl_neg_frac": guard(((vals < 0) & m).float().sum() / n.clamp_min(1), n),
        "kl_seq": guard(torch.where(is_seq, row_sum, 0.0).sum() / n_seq.clamp_min(1), n_seq),
        "kl_seq_max": guard(torch.where(is_seq, row_sum, -torch.inf).amax(), n_seq),
        "tokens": n,
        "response_len": guard(n / n_seq.clamp_min(1), n_seq),
        "kl_hist": hist,
    }


def exact_stats(logits, ref_logits, mask, chunk_size=None) -> dict[str, torch.Tensor]:
    """Mean and max over valid tokens of the exact KL(policy||ref) per token (nats/token)."""
    with torch.no_grad():
        exact = kl_from_logits(logits.detach(), ref_logits.detach(), chunk_size=chunk_size)
    if mask is None:
        mask = torch.ones_like(exact, dtype=torch.bool)
    m = _checks.mask_like("mask", mask, "kl_from_logits(logits, ref_logits)", exact) > 0
    n = m.float().sum()
    nan = torch.tensor(float("nan"), device=exact.device)
    return {
        "kl_exact": torch.where(n > 0, (exact * m).sum() / n.clamp_min(1), nan),
        "kl_exact_max": torch.where(n > 0, torch.where(m, exact, -torch.inf).amax(), nan),
    }, exact


def batch_mean(name: str, x, mask=None) -> torch.Tensor | float:
    """A scalar metric from a number, a 0-d tensor, ``[B]`` per-sequence or ``[B, T]`` per-token values."""
    if isinstance(x, torch.Tensor):
        _checks.tensor(name, x, floating=True)
        x = x.detach()
        if x.dim() == 0:
            return x.float()
        if mask is not None and x.shape == mask.shape:
            mf = (mask > 0).float()
            return (x.float() * mf).sum() / mf.sum().clamp_min(1)
        if x.dim() > 1:
            raise ValueError(
                f"{name} must be a number, a [B] per-sequence tensor or a per-token tensor of mask's shape, "
                f"got shape {tuple(x.shape)}"
            )
        return x.float().mean() if x.numel() else torch.tensor(float("nan"), device=x.device)
    return float(_checks.scalar(name, x))


def to_host(values: dict) -> dict:
    """Move every tensor in ``values`` to Python numbers with a single device-to-host transfer.

    0-d tensors become floats, 1-d tensors lists of numbers (``kl_hist``: ints);
    non-finite values become ``None`` (JSON has no NaN).
    """
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        parts = [v.reshape(-1).to(device=device, dtype=torch.float64) for v in tensors.values()]
        host = torch.cat(parts).tolist()  # the one transfer of the step
        i = 0
        for (k, v), p in zip(tensors.items(), parts):
            chunk = host[i : i + p.numel()]
            i += p.numel()
            out[k] = [int(c) for c in chunk] if v.dim() == 1 else chunk[0]
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out
