"""Exact per-token KL between two next-token distributions given as logits."""

from __future__ import annotations

import torch

from . import _checks, _kernels, _triton

DIRECTIONS = ("reverse", "forward")


class _ExactKL(torch.autograd.Function):
    """KL(softmax(a/T) || softmax(b/T)) per row of 2-D ``a``, ``b`` [N, V].

    Saves the inputs and five per-row scalars; backward recomputes the
    softmaxes block by block.
    """

    @staticmethod
    def forward(ctx, a, b, inv_temp, chunk_size):
        res = _triton.guarded(_triton.kl_fwd, a, b, inv_temp) if _triton.wanted(a, b) else None
        ctx.triton = res is not None  # CUDA with Triton: one read of each input, no blocks
        if res is None:
            res = _kernels.forward("kl", (a, b), inv_temp, chunk_size)
        kl, *row_stats = res  # c_a, log_s_a, c_b, log_s_b
        ctx.save_for_backward(a, b, kl, *row_stats)
        ctx.inv_temp, ctx.chunk_size = inv_temp, chunk_size
        return kl

    @staticmethod
    def backward(ctx, g):
        a, b, kl, *row_stats = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = a.shape
        g = g.to(kl.dtype)
        grads = _triton.guarded(_triton.kl_bwd, a, b, *row_stats, kl, g, ctx.inv_temp, need_a, need_b) if ctx.triton else None
        if grads is not None:  # (else the torch kernels: the saved row statistics mean the same)
            return (*grads, None, None)
        grad_a = grad_b = None
        whole = None
        for s, e in _kernels.blocks(n, v, ctx.chunk_size):
            ga, gb = _kernels.run(
                "kl_bwd", n * v, a[s:e], b[s:e], *(r[s:e] for r in row_stats), kl[s:e], g[s:e],
                ctx.inv_temp, need_a, need_b,
            )
            whole = s == 0 and e == n
            if whole:
                grad_a, grad_b = ga, gb
                continue
            if need_a:
                grad_a = torch.empty_like(a) if grad_a is None else grad_a
                grad_a[s:e] = ga
            if need_b:
                grad_b = torch.empty_like(b) if grad_b is None else grad_b
                grad_b[s:e] = gb
        return grad_a, grad_b, None, None


def kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Exact KL between the policy's and the reference's next-token distributions.

    With :math:`\pi = \mathrm{softmax}(z/\tau)` (policy) and
    :math:`\pi_{ref} = \mathrm{softmax}(z_{ref}/\tau)`, per position t:

    * ``"reverse"``: :math:`KL(\pi \| \pi_{ref}) = \sum_v \pi_v (\log \pi_v - \log \pi_{ref,v})`
      (the KL that RLHF penalises; what k1/k2/k3 estimate from samples);
    * ``"forward"``: :math:`KL(\pi_{ref} \| \pi) = \sum_v \pi_{ref,v} (\log \pi_{ref,v} - \log \pi_v)`.

    Args:
        logits: policy logits ``[..., T, V]``, floating.
        ref_logits: reference logits, same shape.
        direction: ``"reverse"`` or ``"forward"``.
        temperature: ``tau > 0`` applied to both.
        chunk_size: rows per block (see :func:`logprobs_from_logits`).

    Returns:
        ``[..., T]`` fp32 (fp64 for fp64 logits) KL in **nats per token**.
        Differentiable with respect to both inputs; never holds a full
        ``[..., V]`` softmax in memory. Vocabulary entries with probability 0
        under the first distribution contribute 0; an entry where the first has
        mass and the second has none makes the KL infinite, which is an error.
    """
    _checks.tensor("logits", logits, floating=True)
    _checks.tensor("ref_logits", ref_logits, floating=True)
    _checks.min_dim("logits", logits, 1, "[..., V]")
    _checks.same_shape("logits", logits, "ref_logits", ref_logits)
    _checks.choice("direction", direction, DIRECTIONS)
    temperature = _checks.scalar("temperature", temperature, positive=True)
    chunk_size = _checks.chunk_rows("chunk_size", chunk_size)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits must be on the device of logits ({logits.device}), got {ref_logits.device}")
    if ref_logits.dtype != logits.dtype:
        ref_logits = ref_logits.to(logits.dtype) if logits.dtype == torch.float64 else ref_logits
    a, b = (logits, ref_logits) if direction == "reverse" else (ref_logits, logits)
    out = _ExactKL.apply(a.reshape(-1, vocab), b.reshape(-1, vocab), 1.0 / float(temperature), chunk_size)
    _checks.finite("logits/ref_logits (the KL computed from them)", out.detach())
    return out.reshape(logits.shape[:-1])
