"""Masked reductions of per-token values, optionally global over torch.distributed ranks."""

from __future__ import annotations

import torch

from . import _checks
from .estimators import check_weights

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _all_reduce_sum(stats: torch.Tensor, group) -> torch.Tensor:
    """Sum ``stats`` over the ranks of ``group``; gradients flow to the local part."""
    import torch.distributed as dist

    total = stats.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    # value: the global sum; gradient: d(global)/d(local) = 1
    return stats + (total - stats.detach())


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    group=None,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Reduce per-token ``values`` over the valid tokens of ``mask`` to a scalar.

    With :math:`m_{bt} \in \{0, 1\}`, :math:`n_b = \sum_t m_{bt}` and only rows
    with :math:`n_b > 0` counted as sequences (:math:`S` of them):

    * ``"token-mean"``: :math:`\sum_{b,t} m_{bt} v_{bt} / \sum_b n_b`
      (per-token mean; for KL values: nats per token);
    * ``"seq-mean-token-mean"``: :math:`\frac1S \sum_b \frac{1}{n_b}\sum_t m_{bt} v_{bt}`
      (each sequence weighs the same; nats per token);
    * ``"seq-mean-token-sum"``: :math:`\frac1S \sum_b \sum_t m_{bt} v_{bt}`
      (per-sequence sum; for KL values: nats per sequence).

    An all-masked row is legal and contributes nothing (it is not a sequence);
    an entirely masked batch gives 0.

    With ``group`` (a torch.distributed process group, or
    ``torch.distributed.group.WORLD``), the numerator and denominator are
    summed over the ranks in one all-reduce, so the result is the global one on
    the concatenated batch (not a mean of per-rank means) and is identical on
    every rank. Gradients flow to the local values (with the global
    denominator); the all-reduce itself is not differentiated. So the *sum*
    over ranks of the local gradients is the gradient of the global value:
    under DDP, FSDP or DeepSpeed, which *average* gradients over ranks,
    multiply the loss by the world size (klbelt's trainer does).

    Args:
        values: ``[B, T]`` (or ``[..., T]``) floating tensor.
        mask: same shape, bool or 0/1.
        mode: one of the modes above.
        group: optional process group for a global reduction.
        weights: optional importance weights :math:`w = \pi/\mu` of ``values``'
            shape, for tokens drawn from a sampler :math:`\mu` rather than the
            policy (see :func:`klbelt.kl.importance_weights`): :math:`v` is
            replaced by :math:`w v` in the sums above while the counts stay
            token (or sequence) counts, the ordinary (not self-normalised)
            importance-sampling estimate, unbiased for the policy's mean with
            untruncated weights. Weights are constants (detached). Do not
            also pass them to :func:`kl_per_token`.

    Returns:
        0-d tensor of ``values``' dtype.
    """
    if weights is not None:
        _checks.tensor("values", values, floating=True)
        values = values * check_weights("weights", weights, values)
    return aggregate_many([values], mask, [mode], group=group)[0]


def _sums(name: str, values: torch.Tensor, m: torch.Tensor, mode: str) -> torch.Tensor:
    """Local ``[numerator, count]`` of one mode (see :func:`aggregate`), in ``values``' dtype."""
    _checks.tensor(name, values, floating=True)
    _checks.min_dim(name, values, 1, "[..., T]")
    _checks.same_shape(name, values, "mask", m)
    masked = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    _checks.finite(f"{name} (at valid mask positions)", masked.detach())
    if mode == "token-mean":
        return torch.stack([masked.sum(), m.sum().to(values.dtype)])
    row_sum = masked.sum(-1)
    is_seq = m.sum(-1) > 0
    per_row = row_sum / m.sum(-1).clamp_min(1) if mode == "seq-mean-token-mean" else row_sum
    return torch.stack([torch.where(is_seq, per_row, 0.0).sum(), is_seq.to(values.dtype).sum()])


def aggregate_many(
    values: list[torch.Tensor],
    mask: torch.Tensor,
    modes: list[str],
    group=None,
) -> list[torch.Tensor]:
    """``[aggregate(v, mask, mode, group) for v, mode in zip(values, modes)]`` with **one** all-reduce.

    Each global reduction costs a network round trip whatever its size, so a
    loss and its statistics over the same mask are best reduced together: the
    numerators and counts of all of them travel in one float64 all-reduce.
    Results and gradients are those of :func:`aggregate`.
    """
    if not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"values must be a non-empty list of tensors, got {type(values).__name__}")
    if len(modes) != len(values):
        raise ValueError(f"modes must give one mode per value: {len(values)} values, {len(modes)} modes")
    m = _checks.mask_like("mask", mask, "values", _checks.tensor("values", values[0], floating=True))
    for mode in modes:
        _checks.choice("mode", mode, MODES)
    if group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group was given but torch.distributed is not initialized (call init_process_group first)")
    names = ["values"] if len(values) == 1 else [f"values[{i}]" for i in range(len(values))]
    stats = [_sums(name, v, m, mode) for name, v, mode in zip(names, values, modes)]
    if group is not None:
        reduced = _all_reduce_sum(torch.cat([s.double() for s in stats]), group)
        stats = [reduced[2 * i : 2 * i + 2].to(s.dtype) for i, s in enumerate(stats)]
    return [s[0] / s[1].detach().clamp_min(1) for s in stats]
