"""Log-probabilities of chosen tokens, without a full log-softmax in memory."""

from __future__ import annotations

import torch

from . import _checks, _kernels, _triton


class _LogProbs(torch.autograd.Function):
    """logp[i] = x[i, t_i] / T - logsumexp(x[i] / T), over 2-D ``x`` [N, V].

    Saves only the input and the per-row log-sum-exp (as shift + log-sum); the backward pass
    recomputes the softmax block by block: dlogp/dx = (onehot(t) - p) / T.
    """

    @staticmethod
    def forward(ctx, x, t, inv_temp, chunk_size):
        res = _triton.guarded(_triton.logprob_fwd, x, t, inv_temp) if _triton.wanted(x) else None
        ctx.triton = res is not None  # CUDA with Triton: one read of x, no blocks
        out, c, log_s = res if ctx.triton else _kernels.forward("logprob", (x, t), inv_temp, chunk_size)
        ctx.save_for_backward(x, t, c, log_s)
        ctx.inv_temp, ctx.chunk_size = inv_temp, chunk_size
        return out

    @staticmethod
    def backward(ctx, g):
        x, t, c, log_s = ctx.saved_tensors
        n, v = x.shape
        g = g.to(c.dtype)
        grad = _triton.guarded(_triton.logprob_bwd, x, t, c, log_s, g, ctx.inv_temp) if ctx.triton else None
        if grad is not None:  # (else the torch kernels: the saved row statistics mean the same)
            return grad, None, None, None
        grad = None
        for s, e in _kernels.blocks(n, v, ctx.chunk_size):
            block = _kernels.run("logprob_bwd", n * v, x[s:e], t[s:e], c[s:e], log_s[s:e], g[s:e], ctx.inv_temp)
            if s == 0 and e == n:
                grad = block
            else:
                if grad is None:
                    grad = torch.empty_like(x)
                grad[s:e] = block
        return grad, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Log-probability of each chosen token under ``softmax(logits / temperature)``.

    .. math:: \log \pi(y_t) = z_{t, y_t} / \tau - \log \sum_v \exp(z_{t,v} / \tau)

    Args:
        logits: ``[..., T, V]`` floating tensor (fp32, bf16, fp16 or fp64).
        tokens: ``[..., T]`` integer tensor of token ids in ``[0, V)``.
        temperature: ``tau > 0``; use the sampling temperature so the
            log-probs are those of the distribution the tokens came from.
        chunk_size: rows (positions) per block. ``None`` picks one: all rows
            when the kernel is compiled (one fused pass, no ``[N, V]``
            intermediate), about 4 MB of fp32 per block in eager mode.

    Returns:
        ``[..., T]`` fp32 log-probabilities (fp64 for fp64 logits), nats.
        bf16/fp16 logits are upcast block by block; a full log-softmax over the
        vocabulary is never held in memory, forward or backward. Differentiable
        with respect to ``logits``.
    """
    _checks.tensor("logits", logits, floating=True)
    _checks.tensor("tokens", tokens, integer=True)
    _checks.min_dim("logits", logits, 1, "[..., V]")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} "
            f"(logits is {tuple(logits.shape)}), got {tuple(tokens.shape)}"
        )
    temperature = _checks.scalar("temperature", temperature, positive=True)
    chunk_size = _checks.chunk_rows("chunk_size", chunk_size)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens must be on the device of logits ({logits.device}), got {tokens.device}")
    if tokens.numel():
        _checks.require(
            ((tokens >= 0) & (tokens < vocab)).all(),
            ValueError,
            f"tokens must be token ids in [0, {vocab}) for a vocabulary of {vocab}; got a value outside it",
        )
    x = logits.reshape(-1, vocab)
    t = tokens.reshape(-1).long()
    inv_temp = 1.0 / float(temperature)
    out = _LogProbs.apply(x, t, inv_temp, chunk_size)
    _checks.finite("logits (log-probabilities computed from them)", out.detach())
    return out.reshape(tokens.shape)
