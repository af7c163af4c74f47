"""Triton kernels for CUDA tensors: log-probs and exact KL from logits, and the fused LM head.

Imported lazily (only when a CUDA tensor reaches a kernel, or a test asks for
the interpreter), so the CPU path never needs Triton.

Logits kernels (one program per row, a loop over the vocabulary in
``BLOCK_V`` columns, per-lane online log-sum-exp):

* forward: one read of each logits tensor; out per row the result and the
  row's ``(c, log_s)`` with ``c`` the row maximum and ``log_s = log sum exp(x*s - c)``,
  the numbers the torch kernels of ``_kernels`` save, so both backwards agree;
* backward: one read of each logits tensor plus one write of each gradient.

Fused head (``z = h W^T + b`` never stored): a program owns ``BLOCK_M`` rows
and one of ``n_split`` vocabulary ranges; for each ``[BLOCK_M, BLOCK_V]`` tile
it computes the logits with ``tl.dot`` (fp32 accumulation; fp32 inputs in
IEEE fp32, no TF32) and folds them into per-row partial sums (max, sum of
exponentials, and the sum of ``exp * z`` for the entropy or of
``exp * (z_a - z_b)`` for the KL). The ``[n_split, N]`` partials are combined
in torch. The backward recomputes each tile, forms ``G = dL/dz`` exactly (no
filtering) and adds ``G W`` and ``G^T h`` (and ``sum G`` for the bias) into
fp32 accumulators with atomic adds (so the sums' order, and their last bits,
vary from run to run). fp32 inputs accumulate straight into the gradients;
bf16/fp16 ones need fp32 accumulators: ``[N, H]`` for the hidden states and,
for the weight, ``DW_RANGE_BYTES`` at a time (one launch per range of
vocabulary columns), so the extra memory of the backward is ``N * H * 4``
bytes plus ``DW_RANGE_BYTES``.

On CPU tensors the same kernel functions run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks them.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

MIN_TRITON = (3, 0)
_warned: set[str] = set()


# --------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    """(usable, reason) for the installed Triton."""
    try:
        import triton
    except Exception as exc:  # not installed, or broken install
        return False, f"Triton is not importable ({type(exc).__name__}: {exc})"
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False, f"Triton version {triton.__version__!r} could not be read"
    if version < MIN_TRITON:
        want = ".".join(map(str, MIN_TRITON))
        return False, f"Triton {triton.__version__} is older than {want}"
    return True, ""


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"klbelt: {reason}; CUDA tensors use the torch kernels instead (slower, same results)",
            RuntimeWarning,
            stacklevel=4,
        )


_force_cpu = os.environ.get("KLBELT_TRITON_CPU", "0") == "1"
_failure: str | None = None  # why a Triton kernel failed in this process; it is not tried again


def failure() -> str | None:
    """Why the Triton kernels were given up in this process (a compile or launch error), else None."""
    return _failure


def guarded(fn, *args):
    """``fn(*args)``, or None when the Triton compiler or launch fails: one warning, the torch kernels from then on.

    In the interpreter (tests) the error is raised instead: there it is a bug to see, not a GPU to survive.
    """
    global _failure
    try:
        return fn(*args)
    except Exception as exc:
        if interpreting():
            raise
        _failure = f"a Triton kernel failed ({type(exc).__name__}: {str(exc)[:500]})"
        _warn_once(_failure)
        return None


def set_cpu_interpreter(on: bool) -> bool:
    """Run the Triton kernels on CPU tensors in Triton's interpreter (tests); returns the old setting.

    Takes effect only under ``TRITON_INTERPRET=1`` (Triton reads it when imported).
    """
    global _force_cpu
    old, _force_cpu = _force_cpu, bool(on)
    return old


def wanted(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels serve these tensors.

    CUDA tensors of fp32/bf16/fp16 when a usable Triton is installed (else one
    warning naming the reason, then the torch kernels); CPU tensors only in
    Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported) and
    when asked for (:func:`set_cpu_interpreter` or ``KLBELT_TRITON_CPU=1``).
    fp64 always takes the torch kernels (fp64 out).
    """
    x = tensors[0]
    if any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return False
    if x.device.type == "cuda":
        if _failure is not None:
            return False
        ok, reason = _triton_status()
        if not ok:
            _warn_once(reason)
        return ok
    return x.device.type == "cpu" and _force_cpu and interpreting() and _triton_status()[0]


# --------------------------------------------------------------------------- loading


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def kernels():
    """``_triton_kernels``: compiled for the GPU, or interpreted under ``TRITON_INTERPRET=1``."""
    from . import _triton_kernels as module

    if interpreting():
        return _Interpreted(module)
    return module


class _Interpreted:
    """The kernels of ``module`` launched with numpy's floating-point warnings off.

    (-inf) - (-inf) in masked-off lanes is NaN by design and discarded by ``tl.where``.
    """

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        kernel = getattr(self.module, name)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    import numpy

                    with numpy.errstate(invalid="ignore", over="ignore", divide="ignore"):
                        return kernel[grid](*args, **kwargs)

                return launch

        return Launcher()


def _k(x: torch.Tensor):
    return kernels()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along the vocabulary (the kernels index rows by their stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# Launch configuration on CUDA. Row kernels: columns per loop step, warps. Fused head: tiles and warps,
# chosen from ptxas' register counts for sm_90 without a GPU (tests/triton_compile_sm90.py): in bf16
# only the KL backward spills (~100 bytes a thread; fp32 IEEE head kernels up to ~750), where BLOCK_K 64
# or BLOCK_M 128 spilled 200-2000. Unmeasured on a GPU: a tuning pass there may change them.
LOGPROB_BLOCK_V, KL_BLOCK_V, ROW_NUM_WARPS = 2048, 1024, 8
HEAD_BLOCKS = {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 32}
HEAD_NUM_WARPS = 8
# In the interpreter: small, so the tests cross every block edge.
INTERPRETER_BLOCK_V = 64
INTERPRETER_HEAD_BLOCKS = {"BLOCK_M": 16, "BLOCK_V": 16, "BLOCK_K": 16}


def _block_v(x: torch.Tensor, cuda: int) -> int:
    return cuda if x.is_cuda else INTERPRETER_BLOCK_V


def _f32(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------- logits kernels


def logprob_fwd(x: torch.Tensor, t: torch.Tensor, inv_temp: float):
    """As ``_kernels.logprob_fwd``: (log softmax(x*s)[t], c, log_s) per row of ``x`` [n, V]; fp32."""
    x, t = _rows(x), t.contiguous()  # the kernels index per-row vectors with unit stride
    n, v = x.shape
    out, c, log_s = _f32(n, x), _f32(n, x), _f32(n, x)
    if n:
        _k(x)._logprob_fwd_kernel[(n,)](x, t, out, c, log_s, v, x.stride(0), inv_temp,
                                         BLOCK_V=_block_v(x, LOGPROB_BLOCK_V), **_launch(x, ROW_NUM_WARPS))
    return out, c, log_s


def logprob_bwd(x, t, c, log_s, g, inv_temp: float) -> torch.Tensor:
    """As ``_kernels.logprob_bwd``: g * s * (onehot(t) - p), in the dtype of ``x``."""
    x, t = _rows(x), t.contiguous()
    n, v = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n:
        _k(x)._logprob_bwd_kernel[(n,)](x, t, c, log_s, g.float().contiguous(), dx, v, x.stride(0), dx.stride(0),
                                         inv_temp, BLOCK_V=_block_v(x, LOGPROB_BLOCK_V), **_launch(x, ROW_NUM_WARPS))
    return dx


def kl_fwd(a: torch.Tensor, b: torch.Tensor, inv_temp: float):
    """As ``_kernels.kl_fwd``: (KL, c_a, log_s_a, c_b, log_s_b) per row; fp32."""
    a, b = _rows(a), _rows(b)
    n, v = a.shape
    outs = [_f32(n, a) for _ in range(5)]
    if n:
        _k(a)._kl_fwd_kernel[(n,)](a, b, *outs, v, a.stride(0), b.stride(0), inv_temp,
                                    BLOCK_V=_block_v(a, KL_BLOCK_V), **_launch(a, ROW_NUM_WARPS))
    return tuple(outs)


def kl_bwd(a, b, c_a, log_s_a, c_b, log_s_b, kl, g, inv_temp: float, need_a: bool, need_b: bool):
    """As ``_kernels.kl_bwd``: the gradients of sum_i g_i KL_i for ``a`` and ``b`` (None where not needed)."""
    a, b = _rows(a), _rows(b)
    n, v = a.shape
    da = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else None
    db = torch.empty_like(b, memory_format=torch.contiguous_format) if need_b else None
    if n:
        _k(a)._kl_bwd_kernel[(n,)](
            a, b, c_a, log_s_a, c_b, log_s_b, kl, g.float().contiguous(),
            a if da is None else da, b if db is None else db, v, a.stride(0), b.stride(0),
            v if da is None else da.stride(0), v if db is None else db.stride(0), inv_temp,
            NEED_A=need_a, NEED_B=need_b, BLOCK_V=_block_v(a, KL_BLOCK_V), **_launch(a, ROW_NUM_WARPS),
        )
    return da, db


def _launch(x: torch.Tensor, num_warps: int) -> dict:
    return {"num_warps": num_warps} if x.is_cuda else {}


# --------------------------------------------------------------------------- fused head


def _head_blocks(h: torch.Tensor, n: int, v: int, blocks: dict | None):
    """(BLOCK_M, BLOCK_V, BLOCK_K, n_split, cols_per_split) for an ``[n, V]`` problem."""
    if blocks is None:
        blocks = HEAD_BLOCKS if h.is_cuda else INTERPRETER_HEAD_BLOCKS
    bm, bv, bk = blocks["BLOCK_M"], blocks["BLOCK_V"], blocks["BLOCK_K"]
    row_blocks = max(1, -(-n // bm))
    v_tiles = -(-v // bv)
    n_split = blocks.get("n_split")
    if n_split is None:  # enough programs to fill the GPU twice over
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
        n_split = -(-2 * sms // row_blocks)
    n_split = max(1, min(n_split, v_tiles))
    cols = -(-v_tiles // n_split) * bv
    return bm, bv, bk, -(-v // cols), cols


def _blocked_mask(blocked: torch.Tensor | None, v: int, device) -> torch.Tensor | None:
    if blocked is None:
        return None
    mask = torch.zeros(v, dtype=torch.int8, device=device)
    return mask.index_fill_(0, blocked, 1)


def _combine(pm: torch.Tensor, ps: torch.Tensor, px: torch.Tensor):
    """Row max ``c``, ``log_s = log sum exp(z - c)`` and ``sum exp(z - c) y / sum exp(z - c)`` from [n_split, N] partials."""
    c = pm.amax(dim=0)
    r = torch.exp(pm - torch.where(c == float("-inf"), 0.0, c))
    s = (ps * r).sum(dim=0)
    return c, torch.log(s), (px * r).sum(dim=0) / s


class _Head(torch.autograd.Function):
    """Triton twin of ``fused._FusedHead`` (same arguments, outputs and saved row numbers)."""

    @staticmethod
    def forward(ctx, kind, h, w, b, ref, t, blocked, inv_temp, with_entropy, policy_first, blocks):
        n, v = h.shape[0], w.shape[0]
        h, w, t = _rows(h), _rows(w), t.contiguous()
        b = None if b is None else b.contiguous()
        bm, bv, bk, n_split, cols = _head_blocks(h, n, v, blocks)
        mask = _blocked_mask(blocked, v, h.device)
        part = torch.empty(6, n_split, n, dtype=torch.float32, device=h.device)
        is_kl = kind == "kl"
        if is_kl:
            rh, rw, rb = _rows(ref[0]), _rows(ref[1]), None if ref[2] is None else ref[2].contiguous()
            ref = (rh, rw, rb)
            first, second = ((h, w, b), (rh, rw, rb)) if policy_first else ((rh, rw, rb), (h, w, b))
        else:
            first, second = (h, w, b), (h, w, None)
        if n:
            _k(h)._head_fwd_kernel[(-(-n // bm), n_split)](
                first[0], first[1], _or(first[2], h), second[0], second[1], _or(second[2], h), _or(mask, h),
                t if not is_kl else h, *part, n, v, first[0].shape[1], second[0].shape[1],
                first[0].stride(0), first[1].stride(0), second[0].stride(0), second[1].stride(0), inv_temp, cols,
                IS_KL=is_kl, HAS_BIAS=first[2] is not None, HAS_RBIAS=is_kl and second[2] is not None,
                HAS_BLOCKED=mask is not None, IEEE=h.dtype == torch.float32, DOT_F32=_dot_f32(h),
                BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **_launch(h, HEAD_NUM_WARPS),
            )
        c_a, log_s_a, mean_a = _combine(part[0], part[1], part[2])
        entropy = torch.empty(0, dtype=torch.float32, device=h.device)
        if is_kl:  # mean_a = E_p[a - b];  KL = E_p[a - b] - lse_a + lse_b
            c_b, log_s_b, _ = _combine(part[3], part[4], part[4])
            out = (mean_a - (c_a - c_b)) - log_s_a + log_s_b
            rows = (out, c_a, log_s_a, c_b, log_s_b)
        else:  # mean_a = E_p[z]; entropy = lse - E_p[z]
            out = (part[5].sum(dim=0) - c_a) - log_s_a
            if with_entropy:
                entropy = log_s_a - (mean_a - c_a)
            rows = (out, c_a, log_s_a)
        del part
        ref_tensors = ref if ref is not None else (None, None, None)
        ctx.save_for_backward(h, w, b, t, mask, *ref_tensors, *rows)
        ctx.kind, ctx.inv_temp, ctx.policy_first, ctx.blocks = kind, inv_temp, policy_first, blocks
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, w, b, t, mask, rh, rw, rb, *rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        n, v, k = h.shape[0], w.shape[0], h.shape[1]
        f32 = dict(dtype=torch.float32, device=h.device)
        dh = torch.zeros(n, k, **f32) if need_h else None
        db = torch.zeros(v, **f32) if need_b else None
        dw = dw_acc = None
        width = v  # vocabulary columns per launch
        if need_w:
            dw = torch.zeros(v, k, **f32) if h.dtype == torch.float32 else torch.empty(v, k, dtype=h.dtype, device=h.device)
            if h.dtype != torch.float32:  # fp32 accumulator for one range of columns at a time
                width = _range_cols(h, v, k, ctx.blocks)
                dw_acc = torch.empty(width, k, **f32)
        is_kl = ctx.kind == "kl"
        if is_kl:
            kl, c_a, log_s_a, c_b, log_s_b = rows
        else:
            kl, c_a, log_s_a = rows
            c_b = log_s_b = c_a
        if n and (need_h or need_w or need_b):
            g = g.float().contiguous()
            for v_begin in range(0, v, width):
                v_end = min(v_begin + width, v)
                bm, bv, bk, n_split, cols = _head_blocks(h, n, v_end - v_begin, ctx.blocks)
                if dw_acc is not None:
                    dw_acc.zero_()
                _k(h)._head_bwd_kernel[(-(-n // bm), n_split)](
                    h, w, _or(b, h), _or(rh, h), _or(rw, w), _or(rb, h), _or(mask, h), t if not is_kl else h,
                    c_a, log_s_a, c_b, log_s_b, kl, g, _or(dh, h), _or(dw_acc, _or(dw, h)), _or(db, h),
                    n, v, k, k if rh is None else rh.shape[1], h.stride(0), w.stride(0),
                    h.stride(0) if rh is None else rh.stride(0), w.stride(0) if rw is None else rw.stride(0),
                    ctx.inv_temp, cols, v_begin, v_end,
                    IS_KL=is_kl, POLICY_FIRST=bool(ctx.policy_first), HAS_BIAS=b is not None,
                    HAS_RBIAS=is_kl and rb is not None, HAS_BLOCKED=mask is not None,
                    NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, IEEE=h.dtype == torch.float32, DOT_F32=_dot_f32(h),
                    BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **_launch(h, HEAD_NUM_WARPS),
                )
                if dw_acc is not None:
                    dw[v_begin:v_end] = dw_acc[: v_end - v_begin]
        cast = lambda x: None if x is None else x.to(h.dtype)  # noqa: E731
        return None, cast(dh), cast(dw), cast(db), None, None, None, None, None, None, None


DW_RANGE_BYTES = 8 << 20  # the fp32 accumulator of the weight gradient (bf16/fp16 weights), per launch


def _range_cols(h: torch.Tensor, v: int, k: int, blocks: dict | None) -> int:
    """Vocabulary columns per backward launch when the weight gradient needs an fp32 accumulator."""
    if blocks is not None and "range_cols" in blocks:
        return blocks["range_cols"]
    bv = _head_blocks(h, 1, v, blocks)[1]
    return max(bv, DW_RANGE_BYTES // (4 * k) // bv * bv)


def _dot_f32(h: torch.Tensor) -> bool:
    """Upcast bf16/fp16 tiles before ``tl.dot`` in the interpreter (its half-precision dot is wrong; Triton 3.9)."""
    return interpreting() and h.dtype != torch.float32


def _or(x, default):
    return default if x is None else x


def head(kind, h, w, b, ref, t, blocked, inv_temp, with_entropy, policy_first, blocks=None):
    """The fused head in Triton: ``(out, entropy)`` as ``fused._FusedHead.apply`` returns them.

    ``blocks``: tile sizes and vocabulary split (``BLOCK_M``, ``BLOCK_V``, ``BLOCK_K``, ``n_split``) for tests.
    """
    return _Head.apply(kind, h, w, b, ref, t, blocked, inv_temp, with_entropy, policy_first, blocks)
