"""The global observed KL over torch.distributed ranks, so every rank sets the same beta."""

from __future__ import annotations

import torch

from ..kl import _checks


def global_observed_kl(kl_sum, count, group=None) -> torch.Tensor:
    r"""Global mean KL from per-rank sums and counts: :math:`\sum_r S_r / \sum_r N_r`.

    Each rank passes the sum of its KL values and how many there are (tokens
    for a ``"token-mean"`` controller, sequences with the per-sequence sums
    for ``"seq-sum"``). Both are summed over the ranks in **one** all-reduce,
    so the result is the mean over the concatenated global batch (not a mean
    of per-rank means, which is wrong when ranks hold different counts) and is
    bitwise identical on every rank: feeding it to a controller's ``update``
    gives every rank the same beta.

    Args:
        kl_sum: local sum of KL values (float or one-element tensor, finite).
        count: local number of values behind ``kl_sum`` (>= 0; a rank may
            have none).
        group: process group; ``None`` means the default group when
            torch.distributed is initialized and no reduction (this process
            alone) otherwise.

    Returns:
        0-d float64 tensor on ``kl_sum``'s device (CPU for a float): the
        global mean, or 0 when the global count is 0. Detached.
    """
    device = kl_sum.device if isinstance(kl_sum, torch.Tensor) else torch.device("cpu")
    stats = []
    for name, value in (("kl_sum", kl_sum), ("count", count)):
        if isinstance(value, torch.Tensor):
            _checks.scalar(name, value, nonnegative=name == "count")
            stats.append(value.detach().reshape(()).to(device, torch.float64))
        else:
            stats.append(torch.tensor(_checks.scalar(name, value, nonnegative=name == "count"),
                                      dtype=torch.float64, device=device))
    stats = torch.stack(stats)
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if group is not None and not initialized:
        raise ValueError("group was given but torch.distributed is not initialized (call init_process_group first)")
    if initialized:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    total, n = stats[0], stats[1]
    return torch.where(n > 0, total / torch.where(n > 0, n, 1.0), torch.zeros_like(total))
