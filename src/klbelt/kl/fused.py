"""Log-probs, entropy and exact KL straight from the LM head: the ``[N, V]`` logits never exist.

A causal LM's logits are ``z = h W^T (+ b)`` with ``h`` the last hidden states
``[N, H]`` and ``W`` the head weight ``[V, H]``. Over a 152k vocabulary the
logits of one long response are gigabytes, far more than the model's
activations. The functions here compute ``z`` for a block of rows at a time,
reduce it with the same row kernels as :func:`logprobs_from_logits` /
:func:`kl_from_logits` (``_kernels``), and keep only per-row numbers. The
backward pass recomputes each block's logits from ``h`` and ``W`` (one more
matmul per block) instead of storing them, then

    dL/dh = G W,    dL/dW = G^T h,    dL/db = sum_rows G,

with ``G = dL/dz`` of the block; for the KL the same for the reference's
``h_ref, W_ref, b_ref`` when one of them requires a gradient (a frozen
reference computes none). One ``[chunk_size, V]`` logits buffer is reused by
every block; besides it only the block's gradient ``G`` (backward) and, for the
KL, the reference's block (and its ``G`` when it needs a gradient) exist
(compiled kernels; the eager kernels add fp32 temporaries of block size).

Cost: the forward is one matmul plus the row kernel, like matmul + kernel on
materialised logits. The backward needs the block's logits again, so
forward+backward is 4 matmuls where the materialised path does 3 (forward,
``G W`` and ``G^T h``): when the matmuls dominate, the floor is ~4/3 of the
unfused time. (Liger-Kernel avoids the recompute by computing the gradient in
its forward, which needs the upstream gradient then: right for a scalar loss,
not for per-token log-probs whose weights arrive in the backward.)
"""

from __future__ import annotations

import torch

from . import _checks, _kernels, _triton
from .exact import DIRECTIONS

# Default rows per block. The block's logits (and, in the backward, its gradient
# block; for the KL also the reference's block) are the only [rows, V] tensors,
# so their number (BLOCK_BUFFERS) times the block stays under ~0.8 x 1/8 of the
# [N, V] fp32 logits, no buffer exceeds BLOCK_MAX_BYTES whatever N, and no block
# has fewer than BLOCK_MIN_ROWS rows (unless the cap says so). Larger
# blocks would be faster (each block's matmul re-reads the whole weight: 27-row
# blocks ran at ~60% of a 1024-row matmul's FLOP rate on a CPU, 256 rows at ~93%).
BLOCK_FRACTION = 0.8 / 8
BLOCK_BUFFERS = {"logprob": 2, "kl": 3, "kl_ref_grad": 4}  # kl_ref_grad: the reference's gradient block too
BLOCK_MAX_BYTES = 1 << 27
BLOCK_MIN_ROWS = 64  # fewer rows run the matmul far below its rate; for small N the 1/8 gives way


def _block_logits(h, w, b, blocked, buf):
    """``h @ w.T + b`` for one block of rows, in the input dtype; ``blocked`` columns set to -inf.

    Written into ``buf`` (``[rows, V]``, reused by every block: a fresh
    allocation of that size per block costs its page faults again each time).
    """
    z = buf[: h.shape[0]]
    if b is None:
        torch.mm(h, w.t(), out=z)
    else:
        torch.addmm(b, h, w.t(), out=z)
    if blocked is not None:
        z.index_fill_(-1, blocked, float("-inf"))
    return z


def _entropy(z, c, log_s, inv_temp):
    """-sum_v p_v log p_v per row, with log p = z*s - c - log_s (0 log 0 = 0)."""
    logp = (_kernels._scaled(z, inv_temp) - c.unsqueeze(-1)) - log_s.unsqueeze(-1)
    p = torch.exp(logp)
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


def _block_forward(kind: str, rows, inv_temp: float, total_numel: int) -> list[torch.Tensor]:
    """The row kernel's forward on one block; compiled when the *whole* problem is worth compiling.

    (Deciding on the block's own size would run small blocks eagerly, with fp32
    temporaries, although the compilation is paid once for all blocks.)
    """
    if not _kernels._want_compile(total_numel):
        return _kernels.forward(kind, rows, inv_temp, None)  # eager, in ~4 MB sub-blocks
    one_pass = rows[0].device.type == "cpu"
    outs = list(_kernels.run(f"{kind}_fwd_one_pass" if one_pass else f"{kind}_fwd", total_numel, *rows, inv_temp))
    if one_pass:
        _kernels._redo_rows(kind, rows, inv_temp, outs)
    return outs


class _FusedHead(torch.autograd.Function):
    """Row-block loop shared by the log-prob and the exact-KL paths.

    ``kind == "logprob"``: output logp[i] = log softmax(z_i / T)[t_i] (and the
    detached entropy). ``kind == "kl"``: output KL per row between the policy
    (``h, w, b``) and the reference (``rh, rw, rb``); ``policy_first`` says
    whether the policy is the first argument of the KL (reverse) or the second
    (forward). Both sides get their gradients as autograd asks for them; a side
    none of whose tensors requires a gradient costs nothing in the backward.
    ``shared_weight``: ``w`` and ``rw`` are one tensor, whose gradient (both
    sides) is returned once, at ``w``'s place. Saved for backward: the inputs
    and a few numbers per row.
    """

    @staticmethod
    def forward(ctx, kind, h, w, b, rh, rw, rb, t, blocked, inv_temp, step, with_entropy, policy_first, shared_weight):
        n = h.shape[0]
        acc = _kernels.acc_dtype(h.dtype)
        outs: list[torch.Tensor] = []
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=h.device)
        buf = h.new_empty(min(step, n), w.shape[0])
        ref_buf = None if rh is None else rh.new_empty(min(step, n), w.shape[0])
        for s in range(0, n, step):
            e = min(s + step, n)
            with torch.no_grad():
                z = _block_logits(h[s:e], w, b, blocked, buf)
                if kind == "logprob":
                    res = _block_forward("logprob", (z, t[s:e]), inv_temp, n * z.shape[-1])
                    if with_entropy:  # eager: in sub-blocks, its fp32 temporaries stay ~4 MB
                        sub = max(1, _kernels.EAGER_CHUNK_NUMEL // z.shape[-1])
                        for a in range(0, e - s, sub):
                            rows = slice(a, min(a + sub, e - s))
                            entropy[s + rows.start : s + rows.stop] = _entropy(z[rows], res[1][rows], res[2][rows], inv_temp)
                else:
                    zr = _block_logits(rh[s:e], rw, rb, blocked, ref_buf)
                    pair = (z, zr) if policy_first else (zr, z)
                    res = _block_forward("kl", pair, inv_temp, n * z.shape[-1])
                    del zr, pair
                del z
            if not outs:
                outs = [torch.empty(n, dtype=r.dtype, device=h.device) for r in res]
            for out, r in zip(outs, res):
                out[s:e] = r
        del buf, ref_buf
        if not outs:  # no rows
            outs = _kernels.forward(kind, (h.new_empty(0, w.shape[0]),) * 2, inv_temp, None)
        ctx.save_for_backward(h, w, b, rh, rw, rb, t, blocked, *outs)
        ctx.kind, ctx.inv_temp, ctx.step, ctx.policy_first = kind, inv_temp, step, policy_first
        ctx.shared_weight = shared_weight
        ctx.mark_non_differentiable(entropy)
        return outs[0], entropy

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, w, b, rh, rw, rb, t, blocked, *outs = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_pol, need_ref = any(need[1:4]), any(need[4:7])
        n = h.shape[0]
        # one gradient buffer per input that wants it; a shared weight's two sides add into one
        grad_h = torch.empty_like(h) if need[1] else None
        grad_w = torch.zeros_like(w) if need[2] or (ctx.shared_weight and need[5]) else None
        grad_rh = torch.empty_like(rh) if need[4] else None
        grad_rw = grad_w if ctx.shared_weight else (torch.zeros_like(rw) if need[5] else None)
        # biases: summed over the row blocks in the accumulation dtype, rounded once at the end
        grad_b = torch.zeros_like(b, dtype=_kernels.acc_dtype(b.dtype)) if need[3] else None
        grad_rb = torch.zeros_like(rb, dtype=_kernels.acc_dtype(rb.dtype)) if need[6] else None
        # bf16/fp16 weights over several row blocks: their gradient would be rounded once per block, so it
        # is formed after the loop by ranges of columns, each over all rows in one matmul (one rounding)
        by_columns = n > ctx.step and w.dtype in (torch.bfloat16, torch.float16) and (
            grad_w is not None or grad_rw is not None)
        weights = (grad_w, grad_rw)
        if by_columns:
            grad_w = grad_rw = None
        g = g.to(outs[0].dtype)
        buf = h.new_empty(min(ctx.step, n), w.shape[0])
        ref_buf = None if rh is None else rh.new_empty(min(ctx.step, n), w.shape[0])
        for s in range(0, n, ctx.step):
            e = min(s + ctx.step, n)
            z = _block_logits(h[s:e], w, b, blocked, buf)
            rows = (r[s:e] for r in outs)
            gz = gzr = None
            if ctx.kind == "logprob":
                out, c, log_s = rows
                gz = _kernels.run("logprob_bwd", n * z.shape[-1], z, t[s:e], c, log_s, g[s:e], ctx.inv_temp)
            else:
                kl, c_a, log_s_a, c_b, log_s_b = rows
                zr = _block_logits(rh[s:e], rw, rb, blocked, ref_buf)
                a, bb = (z, zr) if ctx.policy_first else (zr, z)
                need_a, need_b = (need_pol, need_ref) if ctx.policy_first else (need_ref, need_pol)
                ga, gb = _kernels.run(
                    "kl_bwd", n * z.shape[-1], a, bb, c_a, log_s_a, c_b, log_s_b, kl, g[s:e], ctx.inv_temp, need_a, need_b
                )
                gz, gzr = (ga, gb) if ctx.policy_first else (gb, ga)
                del zr, a, bb, ga, gb
            del z
            _add_head_grads(gz, h[s:e], w, blocked, grad_h, grad_w, grad_b, s, e)
            _add_head_grads(gzr, None if rh is None else rh[s:e], rw, blocked, grad_rh, grad_rw, grad_rb, s, e)
            del gz, gzr  # before the next block's logits: the block budget (BLOCK_BUFFERS) holds
        del buf, ref_buf
        if by_columns:
            grad_w, grad_rw = weights
            _weight_grads_by_columns(ctx, h, w, b, rh, rw, rb, t, blocked, outs, g, grad_w, grad_rw)
        if ctx.shared_weight:
            grad_rw = None  # already inside grad_w
        grad_b = None if grad_b is None else grad_b.to(b.dtype)
        grad_rb = None if grad_rb is None else grad_rb.to(rb.dtype)
        return (None, grad_h, grad_w, grad_b, grad_rh, grad_rw, grad_rb) + (None,) * 7


def _weight_grads_by_columns(ctx, h, w, b, rh, rw, rb, t, blocked, outs, g, grad_w, grad_rw):
    """dL/dW (policy ``grad_w``, reference ``grad_rw``; one buffer for a shared weight) by ranges of vocabulary
    columns, each over all rows: the range's logits recomputed from the saved row numbers (a row block's
    worth of elements at a time), its ``dL/dz`` as in the row loop, then one matmul per weight and range,
    accumulated in fp32 and rounded once, as the unfused path and the Triton kernel round it."""
    n, vocab = h.shape[0], w.shape[0]
    cols = max(1, min(vocab, ctx.step * vocab // max(n, 1)))
    pol, ref = grad_w is not None, grad_rw is not None and not ctx.shared_weight
    both = ctx.shared_weight and grad_w is not None and ctx.needs_input_grad[5] and ctx.needs_input_grad[2]
    stacked = torch.cat([h, rh]) if both else None  # a shared weight: both sides' rows in one matmul
    zbuf = h.new_empty(n * cols)
    zrbuf = rh.new_empty(n * cols) if ctx.kind == "kl" else None
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        local = None
        if blocked is not None:
            local = blocked[(blocked >= v0) & (blocked < v1)] - v0
        bias = None if b is None else b[v0:v1]
        z = _block_logits(h, w[v0:v1], bias, local, zbuf[: n * (v1 - v0)].view(n, v1 - v0))
        if ctx.kind == "logprob":
            _, c, log_s = outs
            gz = _logprob_grad_columns(z, t, c, log_s, g, ctx.inv_temp, v0, n * vocab)
            gzr = None
        else:
            kl, c_a, log_s_a, c_b, log_s_b = outs
            rbias = None if rb is None else rb[v0:v1]
            zr = _block_logits(rh, rw[v0:v1], rbias, local, zrbuf[: n * (v1 - v0)].view(n, v1 - v0))
            a, bb = (z, zr) if ctx.policy_first else (zr, z)
            want_pol = pol or (ctx.shared_weight and ctx.needs_input_grad[2])
            want_ref = ref or (ctx.shared_weight and ctx.needs_input_grad[5])
            need_a, need_b = (want_pol, want_ref) if ctx.policy_first else (want_ref, want_pol)
            ga, gb = _kernels.run("kl_bwd", n * vocab, a, bb, c_a, log_s_a, c_b, log_s_b, kl, g, ctx.inv_temp,
                                  need_a, need_b)  # (compiled or not as the row loop: the whole problem's size)
            gz, gzr = (ga, gb) if ctx.policy_first else (gb, ga)
            del zr, a, bb, ga, gb
        del z
        for x in (gz, gzr):
            if x is not None and local is not None:  # d z / d w is 0 where z was overwritten by -inf
                x.index_fill_(-1, local, 0.0)
        if both:
            torch.mm(torch.cat([gz, gzr]).to(h.dtype).t(), stacked, out=grad_w[v0:v1])
        else:
            if gz is not None and pol:
                torch.mm(gz.to(h.dtype).t(), h, out=grad_w[v0:v1])
            if gzr is not None and ref:
                torch.mm(gzr.to(rh.dtype).t(), rh, out=grad_rw[v0:v1])
        del gz, gzr


def _logprob_grad_columns(z, t, c, log_s, g, inv_temp: float, v0: int, total_numel: int) -> torch.Tensor:
    """``dL/dz`` of ``sum_i g_i log p_i(t_i)`` for the logits' columns ``v0 : v0 + C`` (``z`` ``[N, C]``).

    The row kernel's ``logprob_bwd`` on the range (compiled or not by ``total_numel``, as the row loop);
    where a row's token lies outside it, that kernel's chosen-token entry (put on column 0) is replaced
    by the plain ``-g s p`` it would have been.
    """
    width = z.shape[1]
    inside = (t >= v0) & (t < v0 + width)
    gz = _kernels.run("logprob_bwd", total_numel, z, torch.where(inside, t - v0, 0), c, log_s, g, inv_temp)
    out = ~inside
    if out.any():
        p0 = torch.exp((_kernels._scaled(z[out, 0], inv_temp) - c[out]) - log_s[out])
        gz[out, 0] = (-(g[out] * inv_temp) * p0).to(gz.dtype)
    return gz


def _add_head_grads(gz, h, w, blocked, grad_h, grad_w, grad_b, s, e):
    """Add one block's ``G = dL/dz`` (``[rows, V]``) to ``dL/dh = G W``, ``dL/dW += G^T h``, ``dL/db += sum_rows G``.

    ``gz`` None: this side needs no gradient. Rows ``s:e`` of ``grad_h`` are written, the others added to.
    """
    if gz is None or (grad_h is None and grad_w is None and grad_b is None):
        return
    if blocked is not None:  # d z / d(h, w, b) is 0 where z was overwritten by -inf
        gz.index_fill_(-1, blocked, 0.0)
    gz = gz.to(h.dtype)
    if grad_h is not None:
        torch.mm(gz, w, out=grad_h[s:e])
    if grad_w is not None:
        grad_w.addmm_(gz.t(), h)
    if grad_b is not None:
        grad_b.add_(gz.sum(dim=0, dtype=grad_b.dtype))


def _check_head(prefix: str, hidden, weight, bias):
    """Check ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``; return (V, H)."""
    hn, wn, bn = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    _checks.tensor(hn, hidden, floating=True)
    _checks.tensor(wn, weight, floating=True)
    _checks.min_dim(hn, hidden, 1, "[..., H]")
    if weight.dim() != 2:
        raise ValueError(f"{wn} must be the LM-head weight [V, H] (2 dimensions), got shape {tuple(weight.shape)}")
    vocab, size = weight.shape
    if vocab == 0:
        raise ValueError(f"{wn} must have a non-empty vocabulary dimension, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != size:
        raise ValueError(
            f"{hn} must have hidden size {size} in its last dimension to match {wn} of shape "
            f"{tuple(weight.shape)} ([V, H]), got {hn} of shape {tuple(hidden.shape)}"
        )
    if weight.device != hidden.device or weight.dtype != hidden.dtype:
        raise ValueError(
            f"{wn} must be on the device and have the dtype of {hn} ({hidden.device}, {hidden.dtype}), "
            f"got {wn} on {weight.device} with dtype {weight.dtype}"
        )
    if bias is not None:
        _checks.tensor(bn, bias, floating=True)
        if bias.shape != (vocab,):
            raise ValueError(f"{bn} must have shape ({vocab},) to match {wn} {tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise ValueError(
                f"{bn} must be on the device and have the dtype of {hn} ({hidden.device}, {hidden.dtype}), "
                f"got {bn} on {bias.device} with dtype {bias.dtype}"
            )
    return vocab, size


def _check_blocked(blocked, vocab: int, device) -> torch.Tensor | None:
    if blocked is None:
        return None
    _checks.tensor("blocked", blocked, integer=True)
    if blocked.dim() != 1:
        raise ValueError(f"blocked must be a 1-D tensor of token ids, got shape {tuple(blocked.shape)}")
    if blocked.numel():
        _checks.require(
            ((blocked >= 0) & (blocked < vocab)).all(),
            ValueError,
            f"blocked must hold token ids in [0, {vocab}) for a vocabulary of {vocab}; got a value outside it",
        )
    return blocked.to(device=device, dtype=torch.long)


def _rows_per_block(kind: str, n: int, vocab: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    """Rows per block: the caller's ``chunk_size``, else the policy described at ``BLOCK_FRACTION``."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = int(BLOCK_FRACTION * n * 4 / (BLOCK_BUFFERS[kind] * itemsize))
    rows = min(max(rows, BLOCK_MIN_ROWS), BLOCK_MAX_BYTES // (vocab * itemsize))
    return max(1, min(n, rows))


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    blocked: torch.Tensor | None = None,
):
    r"""Log-probability of each chosen token from the last hidden states and the LM-head weight.

    .. math:: z = h W^\top + b, \qquad \log \pi(y) = z_y / \tau - \log \sum_v \exp(z_v / \tau)

    The same numbers as ``logprobs_from_logits(hidden @ weight.T + bias, tokens)``
    without the ``[..., V]`` logits: rows are processed ``chunk_size`` at a
    time, forward and backward (the backward recomputes each block's logits).

    Args:
        hidden: ``[..., H]`` last hidden states (after the model's final norm).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``
            (may be the tied input embedding; its gradients then add up).
        tokens: ``[...]`` integer token ids in ``[0, V)``, ``hidden.shape[:-1]``.
        bias: optional ``[V]`` head bias.
        temperature: ``tau > 0``, the sampling temperature.
        chunk_size: rows per block; ``None`` keeps the blocks' logits (forward
            and backward) under ~1/10 of the ``[N, V]`` fp32 logits, at most
            128 MB and (memory allowing) at least 64 rows per block. Unused by
            the Triton kernel (CUDA tensors), which holds no logits block.
        with_entropy: also return the entropy ``-sum_v pi_v log pi_v`` (nats,
            detached) of each position's distribution.
        blocked: optional 1-D token ids whose logits are set to ``-inf`` before
            the softmax (tokens the sampler could never emit).

    Returns:
        ``[...]`` fp32 log-probabilities (fp64 for fp64 input), nats;
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.
        With ``with_entropy=True`` a pair ``(logprobs, entropy)``.
    """
    vocab, _ = _check_head("", hidden, weight, bias)
    _checks.tensor("tokens", tokens, integer=True)
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(
            f"tokens must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])} "
            f"(hidden is {tuple(hidden.shape)}), got {tuple(tokens.shape)}"
        )
    temperature = _checks.scalar("temperature", temperature, positive=True)
    chunk_size = _checks.chunk_rows("chunk_size", chunk_size)
    if tokens.device != hidden.device:
        raise ValueError(f"tokens must be on the device of hidden ({hidden.device}), got {tokens.device}")
    if tokens.numel():
        _checks.require(
            ((tokens >= 0) & (tokens < vocab)).all(),
            ValueError,
            f"tokens must be token ids in [0, {vocab}) for a vocabulary of {vocab}; got a value outside it",
        )
    blocked = _check_blocked(blocked, vocab, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(-1).long()
    res = None
    if _triton.wanted(h, weight):  # CUDA with Triton: matmul and log-sum-exp in one kernel, no blocks
        res = _triton.guarded(
            _triton.head, "logprob", h, weight, bias, None, t, blocked, 1.0 / float(temperature), bool(with_entropy), True
        )
    if res is not None:
        out, entropy = res
    else:
        step = _rows_per_block("logprob", h.shape[0], vocab, h.dtype, chunk_size)
        out, entropy = _FusedHead.apply(
            "logprob", h, weight, bias, None, None, None, t, blocked, 1.0 / float(temperature), step,
            bool(with_entropy), True, False,
        )
    _checks.finite("hidden/weight (log-probabilities computed from them)", out.detach())
    out = out.reshape(tokens.shape)
    return (out, entropy.reshape(tokens.shape)) if with_entropy else out


def kl_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    direction: str = "reverse",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    blocked: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Exact per-token KL between policy and reference, from hidden states and LM-head weights.

    With :math:`\pi = \mathrm{softmax}((hW^\top + b)/\tau)` and
    :math:`\pi_{ref} = \mathrm{softmax}((h_{ref}W_{ref}^\top + b_{ref})/\tau)`:
    ``"reverse"`` gives :math:`KL(\pi \| \pi_{ref})`, ``"forward"``
    :math:`KL(\pi_{ref} \| \pi)`, in **nats per token**, as
    :func:`kl_from_logits` would on the two logits, but neither ``[N, V]``
    tensor is ever held.

    Args:
        hidden, weight, bias: the policy's last hidden states ``[..., H]``, head ``[V, H]``, bias ``[V]``.
        ref_hidden, ref_weight, ref_bias: the reference's (hidden size may
            differ; vocabulary must match). They get gradients as autograd
            asks for them (any that requires one); pass them detached, or
            without ``requires_grad``, for a frozen reference, which then
            costs nothing in the backward.
        direction: ``"reverse"`` or ``"forward"``.
        temperature: ``tau > 0`` applied to both.
        chunk_size: rows per block (see :func:`logprobs_from_hidden`).
        blocked: optional 1-D token ids masked to ``-inf`` in both distributions.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 input) KL, differentiable with respect
        to both sides: with :math:`G = \partial L / \partial z` of a side's
        logits, :math:`\partial L/\partial h = G W`, :math:`\partial L/\partial W = G^\top h`,
        :math:`\partial L/\partial b = \sum_{rows} G`, where for
        :math:`KL(p \| q)` the first argument has :math:`G = s\,p\,(\log p - \log q - KL)`
        and the second :math:`G = s\,(q - p)`, :math:`s = 1/\tau`. A weight passed as both
        ``weight`` and ``ref_weight`` (one tensor) gets the sum of both sides
        (the total derivative), accumulated in one buffer.
    """
    vocab, _ = _check_head("", hidden, weight, bias)
    ref_vocab, _ = _check_head("ref_", ref_hidden, ref_weight, ref_bias)
    if ref_vocab != vocab:
        raise ValueError(
            f"ref_weight must have the vocabulary of weight ({vocab} rows), got shape {tuple(ref_weight.shape)}"
        )
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
            f"got {tuple(ref_hidden.shape[:-1])}"
        )
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden must be on the device of hidden ({hidden.device}), got {ref_hidden.device}")
    _checks.choice("direction", direction, DIRECTIONS)
    temperature = _checks.scalar("temperature", temperature, positive=True)
    chunk_size = _checks.chunk_rows("chunk_size", chunk_size)
    blocked = _check_blocked(blocked, vocab, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    rh = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    # One tensor on both sides (a reference sharing the policy's head): both sides' gradients go into
    # one buffer (the Triton kernel: one fp32 accumulator, rounded once) instead of two summed by autograd.
    shared = weight is ref_weight
    ref_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (ref_hidden, ref_weight, ref_bias)
    )
    t = torch.empty(0, dtype=torch.long, device=hidden.device)
    inv_temp, policy_first = 1.0 / float(temperature), direction == "reverse"
    res = None
    if _triton.wanted(h, weight) and rh.dtype == h.dtype and ref_weight.dtype == h.dtype:
        res = _triton.guarded(
            _triton.head, "kl", h, weight, bias, (rh, ref_weight, ref_bias), t, blocked, inv_temp, False, policy_first
        )
    if res is not None:
        out = res[0]
    else:
        step = _rows_per_block("kl_ref_grad" if ref_grad else "kl", h.shape[0], vocab, h.dtype, chunk_size)
        out, _ = _FusedHead.apply(
            "kl", h, weight, bias, rh, ref_weight, ref_bias, t, blocked, inv_temp, step, False, policy_first, shared
        )
    _checks.finite("hidden/ref_hidden (the KL computed from them)", out.detach())
    return out.reshape(hidden.shape[:-1])
