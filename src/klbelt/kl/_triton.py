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
vary from run to run). For the KL it does so for each side that requires a
gradient: the policy, and the reference when one of its tensors does (one more
launch, which recomputes both tiles again; a frozen reference costs nothing).
fp32 inputs accumulate straight into the gradients; bf16/fp16 ones need fp32
scratch, whose size :func:`backward_scratch_bytes` gives: in the
``"one-pass"`` mode ``[N, H]`` for the hidden states and ``DW_RANGE_BYTES`` of
weight rows at a time (one launch per range of vocabulary columns), i.e.
``4 N H`` bytes plus ``DW_RANGE_BYTES``; in the ``"bounded"`` mode at most
``max(DH_CHUNK_BYTES, DW_RANGE_BYTES)`` (plus ``4 N`` and ``4 V``) for one more
recompute of the logits. The default, ``"auto"``, is one-pass where that fits
``HEAD_BACKWARD_BUDGET_BYTES`` and bounded elsewhere (:func:`head_backward_mode`).
:func:`set_triton` turns the kernels off for CUDA tensors (the torch kernels then).

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
_enabled = os.environ.get("KLBELT_TRITON", "1") != "0"
_failure: str | None = None  # why a Triton kernel failed in this process; it is not tried again


def set_triton(on: bool) -> bool:
    """Let the Triton kernels serve CUDA tensors (the default), or not: the torch kernels then do,
    with the same results (to rounding) and no warning. Returns the old setting.

    ``KLBELT_TRITON=0`` in the environment starts a process with them off. For comparing the two
    paths on one GPU (``klbelt bench fused`` times both) or leaving a kernel that is slow there.
    """
    global _enabled
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    old, _enabled = _enabled, on
    return old


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
    warning naming the reason, then the torch kernels) and :func:`set_triton` has
    not turned them off; CPU tensors only in
    Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported) and
    when asked for (:func:`set_cpu_interpreter` or ``KLBELT_TRITON_CPU=1``).
    fp64 always takes the torch kernels (fp64 out).
    """
    x = tensors[0]
    if not _enabled or any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
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
    """Triton twin of ``fused._FusedHead`` (same arguments, outputs and saved row numbers).

    The backward runs ``_head_bwd_kernel`` once per side that needs a gradient: the policy
    (``h, w, b``) and, for the KL, the reference (``rh, rw, rb``) when one of its tensors
    requires a gradient (a frozen reference launches nothing). Launches and scratch
    buffers: :func:`backward_scratch_bytes`.
    """

    @staticmethod
    def forward(ctx, kind, h, w, b, rh, rw, rb, t, blocked, inv_temp, with_entropy, policy_first, shared_weight, blocks):
        n, v = h.shape[0], w.shape[0]
        h, w, t = _rows(h), _rows(w), t.contiguous()
        b = None if b is None else b.contiguous()
        bm, bv, bk, n_split, cols = _head_blocks(h, n, v, blocks)
        mask = _blocked_mask(blocked, v, h.device)
        part = torch.empty(6, n_split, n, dtype=torch.float32, device=h.device)
        is_kl = kind == "kl"
        if is_kl:
            rh, rw, rb = _rows(rh), _rows(rw), None if rb is None else rb.contiguous()
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
        ctx.save_for_backward(h, w, b, rh, rw, rb, t, mask, *rows)
        ctx.kind, ctx.inv_temp, ctx.policy_first, ctx.blocks = kind, inv_temp, policy_first, blocks
        ctx.shared_weight = shared_weight
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, w, b, rh, rw, rb, t, mask, *rows = ctx.saved_tensors
        need = ctx.needs_input_grad
        is_kl = ctx.kind == "kl"
        if not is_kl:
            rows = [*rows, rows[1], rows[2]]  # (out, c, log_s): the kernel reads the second pair only for the KL
        sides = [_Side((h, w, b), (rh, rw, rb), ctx.policy_first, need[1:4])]
        if is_kl and any(need[4:7]):
            sides.append(_Side((rh, rw, rb), (h, w, b), not ctx.policy_first, need[4:7]))
        if not any(any(side.need) for side in sides):
            return (None,) * 14
        _head_backward(sides, t, mask, rows, g, ctx.kind, ctx.inv_temp, ctx.blocks, ctx.shared_weight)
        pol = sides[0].grads
        ref = sides[1].grads if len(sides) > 1 else (None, None, None)
        if ctx.shared_weight:  # the total derivative sits in the policy's slot
            pol, ref = (pol[0], pol[1] if pol[1] is not None else ref[1], pol[2]), (ref[0], None, ref[2])
        return (None, *pol, *ref) + (None,) * 7


class _Side:
    """One side of the head whose gradient the backward computes: its tensors, the other side's, and which
    argument of the KL it is (``target_first``; the log-prob's policy counts as first)."""

    def __init__(self, own, other, target_first, need):
        self.own, self.other, self.target_first = own, other, bool(target_first)
        self.need = tuple(bool(x) for x in need)  # (hidden, weight, bias)
        self.grads = (None, None, None)


# The backward's fp32 scratch for bf16/fp16 inputs (fp32 inputs accumulate straight into their gradients).
# "one-pass": every tile's logits recomputed once; dL/dh accumulates in fp32 [N, H] over the whole
# vocabulary while dL/dW accumulates DW_RANGE_BYTES of columns at a time. "bounded": two passes, each
# recomputing the logits: dL/dh in DH_CHUNK_BYTES of rows at a time (all columns), then dL/dW and dL/db
# in column ranges (all rows); no scratch grows with N or V. One pass cannot do both with fp32 sums (short
# of storing G, [N, V]): whatever order the tiles are visited in, when the first row of dL/dh (or of
# dL/dW) is complete, every row of dL/dW (resp. dL/dh) has been added to and none is complete, so
# min(N, V) rows of H fp32 partial sums are alive: 4 min(N, V) H bytes, 28-256 MiB at the four
# shapes (N < V there), against a 16 MB target. Matmuls of the head, forward + backward, log-prob (KL
# with a frozen reference): one-pass 4 (6), bounded 5 (8); three matmuls is the unfused floor. With the
# head's weight frozen (LoRA) both modes do 3 (5): bounded's second pass is only for the weight and bias.
DW_RANGE_BYTES = 8 << 20  # the fp32 accumulator of the weight gradient (bf16/fp16 weights), per launch
DH_CHUNK_BYTES = 8 << 20  # "bounded": the fp32 accumulator of the hidden states' gradient, per row chunk
# "auto": one-pass where its scratch stays within this, else bounded: the call's whole extra peak (this,
# plus 12 bytes a row kept from the forward) then stays within the kernel issue's 16 MB target
HEAD_BACKWARD_BUDGET_BYTES = 12 << 20
HEAD_BACKWARD_MODES = ("auto", "one-pass", "bounded")
_head_backward_mode = "auto"


def set_head_backward(mode: str) -> str:
    """How the fused head's backward accumulates bf16/fp16 gradients; returns the old mode.

    ``"one-pass"``: one recompute of the logits, fp32 scratch ``4 N H`` bytes for ``dL/dhidden``
    plus ``DW_RANGE_BYTES``. ``"bounded"``: two recomputes (one more matmul of the head, two for
    the KL) where the weight (or bias) needs its gradient, one where it is frozen (LoRA: then it
    costs nothing over one-pass), fp32 scratch at most ``max(DH_CHUNK_BYTES, DW_RANGE_BYTES)``. ``"auto"`` (default):
    one-pass where its scratch fits ``HEAD_BACKWARD_BUDGET_BYTES`` (12 MiB), bounded elsewhere, so
    the extra memory stays within 16 MB at every size; ask for one-pass to trade ``4 N H`` bytes
    for a matmul. All are exact (fp32 accumulation, no filtering). :func:`backward_scratch_bytes`
    gives the sizes, :func:`head_backward_mode` the mode a problem gets.
    """
    global _head_backward_mode
    if mode not in HEAD_BACKWARD_MODES:
        raise ValueError(f"mode must be one of {HEAD_BACKWARD_MODES}, got {mode!r}")
    old, _head_backward_mode = _head_backward_mode, mode
    return old


def head_backward_mode(n: int, k: int, v: int, dtype: torch.dtype, *, mode: str | None = None, need_w: bool = True,
                       bias: bool = False, ref_k: int | None = None, blocks: dict | None = None) -> str:
    """The backward ``"one-pass"`` or ``"bounded"`` that ``mode`` (default: :func:`set_head_backward`'s)
    gives a problem (arguments as :func:`backward_scratch_bytes`). fp32 inputs: always one-pass (the
    gradients returned are the accumulators; no scratch to bound)."""
    mode = mode or _head_backward_mode
    if mode not in HEAD_BACKWARD_MODES:
        raise ValueError(f"mode must be one of {HEAD_BACKWARD_MODES}, got {mode!r}")
    if dtype == torch.float32:
        return "one-pass"
    if mode != "auto":
        return mode
    one_pass = backward_scratch_bytes(n, k, v, dtype, mode="one-pass", need_w=need_w, bias=bias, ref_k=ref_k,
                                      blocks=blocks)
    return "one-pass" if one_pass["peak"] <= HEAD_BACKWARD_BUDGET_BYTES else "bounded"


def _range_cols(v: int, k: int, blocks: dict | None) -> int:
    """Vocabulary columns per backward launch when the weight gradient needs an fp32 accumulator."""
    if blocks is not None and "range_cols" in blocks:
        return blocks["range_cols"]
    bv = (blocks or HEAD_BLOCKS)["BLOCK_V"]
    return min(v, max(bv, DW_RANGE_BYTES // (4 * k) // bv * bv))


def _dh_rows(n: int, k: int, blocks: dict | None) -> int:
    """Rows per backward launch of the "bounded" mode's first pass (a multiple of BLOCK_M)."""
    if blocks is not None and "dh_rows" in blocks:
        return blocks["dh_rows"]
    bm = (blocks or HEAD_BLOCKS)["BLOCK_M"]
    return max(1, min(n, max(bm, DH_CHUNK_BYTES // (4 * k) // bm * bm)))


def backward_scratch_bytes(n: int, k: int, v: int, dtype: torch.dtype, *, mode: str | None = None,
                           need_w: bool = True, bias: bool = False, ref_k: int | None = None,
                           blocks: dict | None = None) -> dict[str, int]:
    """The fp32 scratch buffers the fused head's backward allocates, in bytes (``name -> bytes``), and their peak.

    For ``n`` rows, hidden size ``k``, vocabulary ``v``, inputs of ``dtype``; the gradient of the hidden
    states is always asked for, that of the weight when ``need_w``, of the bias when ``bias``;
    ``ref_k``: the reference's hidden size when it needs its gradient too (same flags). The buffers
    (the gradients returned to autograd are not scratch: they are kept):

    * ``g``: the upstream gradient in fp32, ``4 n``;
    * fp32 inputs: nothing else (the fp32 accumulators are the gradients returned);
    * ``"one-pass"``: ``dh`` ``4 n k`` per side (``k`` and ``ref_k``), ``dw`` ``4 C k_max`` with
      ``C = _range_cols``, ``db`` ``4 v`` per side, all alive together;
    * ``"bounded"``: ``db`` as above (both passes), ``dh`` ``4 R k_max`` with ``R = _dh_rows`` (first
      pass, freed), then ``dw`` as above (second pass).

    ``peak`` is the most alive at once (the forward's ``[6, n_split, N]`` partials are freed before).
    ``mode`` "auto" (or None under the default) is the mode :func:`head_backward_mode` picks.
    """
    mode = head_backward_mode(n, k, v, dtype, mode=mode, need_w=need_w, bias=bias, ref_k=ref_k, blocks=blocks)
    ks = [k] if ref_k is None else [k, ref_k]
    sides = len(ks)
    out = {"g": 4 * n}
    if dtype == torch.float32:  # every accumulator is the gradient returned
        out["peak"] = out["g"]
        return out
    dw = 4 * _range_cols(v, max(ks), blocks) * max(ks) if need_w else 0
    db = 4 * v * sides if bias else 0
    if mode == "one-pass":
        out.update(dh=sum(4 * n * kk for kk in ks), dw=dw, db=db)
        out["peak"] = out["g"] + out["dh"] + dw + db
    else:
        out.update(dh=4 * _dh_rows(n, max(ks), blocks) * max(ks), dw=dw, db=db)
        out["peak"] = out["g"] + db + max(out["dh"], dw)
    return out


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """An fp32 scratch buffer of the backward (one place, so tests can count them against backward_scratch_bytes)."""
    return torch.empty(numel, dtype=torch.float32, device=like.device)


def _head_backward(sides, t, mask, rows, g, kind, inv_temp, blocks, shared_weight):
    """Fill ``side.grads`` = (dL/dhidden, dL/dweight, dL/dbias) for each side (see ``set_head_backward``)."""
    h0, w0 = sides[0].own[0], sides[0].own[1]
    n, v = h0.shape[0], w0.shape[0]
    half = h0.dtype != torch.float32
    ks = [side.own[0].shape[1] for side in sides]
    bounded = half and head_backward_mode(
        n, ks[0], v, h0.dtype, need_w=any(s.need[1] for s in sides), bias=any(s.need[2] for s in sides),
        ref_k=ks[1] if len(sides) == 2 else None, blocks=blocks) == "bounded"
    g = _scratch(n, h0).copy_(g)
    new = torch.empty_like if half else torch.zeros_like  # fp32: the accumulator is the gradient
    for i, side in enumerate(sides):  # the gradients returned to autograd (kept by the caller)
        hh, ww, _ = side.own
        side.out = [
            new(hh) if side.need[0] else None,
            new(ww) if side.need[1] and not (shared_weight and i == 1) else None,
            _scratch(v, h0).zero_() if side.need[2] else None,
        ]
    if shared_weight and len(sides) == 2:  # one tensor on both sides (both need its gradient, or neither)
        sides[1].out[1] = sides[0].out[1]
    launch = functools.partial(_bwd_launch, t=t, mask=mask, rows=rows, g=g, kind=kind, inv_temp=inv_temp, blocks=blocks)
    if not half:  # accumulate straight into the fp32 gradients, all columns in one launch
        for side in sides:
            launch(side, 0, n, 0, v, *side.need, side.out[0], side.out[1], side.out[2])
    else:
        if bounded:
            if any(s.need[0] for s in sides):  # first pass: dL/dh, a chunk of rows at a time over all columns
                rows_per = _dh_rows(n, max(ks), blocks)
                acc = _scratch(rows_per * max(ks), h0)
                for side, k in zip(sides, ks):
                    for r0 in range(0, n, rows_per) if side.need[0] else ():
                        r1 = min(r0 + rows_per, n)
                        chunk = acc[: (r1 - r0) * k].view(r1 - r0, k).zero_()
                        launch(side, r0, r1, 0, v, True, False, False, chunk, None, None)
                        side.out[0][r0:r1].copy_(chunk)
                        del chunk
                del acc  # before the second pass's accumulator
            dh_acc = [None] * len(sides)
            want = [(False, s.need[1], s.need[2]) for s in sides]
        else:
            dh_acc = [_scratch(n * k, h0).view(n, k).zero_() if s.need[0] else None for s, k in zip(sides, ks)]
            want = [s.need for s in sides]
        if any(any(x) for x in want):
            width = _range_cols(v, max(ks), blocks) if any(s.need[1] for s in sides) else v
            dw_acc = _scratch(width * max(ks), h0) if any(s.need[1] for s in sides) else None
            for v0 in range(0, v, width):
                v1 = min(v0 + width, v)
                pending = None  # the weight gradient dw_acc holds, flushed when the next side needs another
                for side, (nh, nw, nb), dh in zip(sides, want, dh_acc):
                    if not (nh or nw or nb):
                        continue
                    k = side.own[0].shape[1]
                    if nw and side.out[1] is not (pending[0] if pending else None):
                        if pending:
                            pending[0][v0:v1].copy_(pending[1])
                        pending = (side.out[1], dw_acc[: (v1 - v0) * k].view(v1 - v0, k).zero_())
                    launch(side, 0, n, v0, v1, nh, nw, nb, dh, pending[1] if nw else None, side.out[2])
                if pending:
                    pending[0][v0:v1].copy_(pending[1])
            del dw_acc, pending
        for side, dh in zip(sides, dh_acc):
            if dh is not None:
                side.out[0].copy_(dh)
    for side in sides:
        dh, dw, db = side.out
        side.grads = (dh, dw, None if db is None else db.to(side.own[0].dtype))


def _bwd_launch(side, r0, r1, v0, v1, need_h, need_w, need_b, dh, dw, db, *, t, mask, rows, g, kind, inv_temp, blocks):
    """One launch of ``_head_bwd_kernel`` for rows ``r0:r1`` and vocabulary columns ``v0:v1`` of ``side``.

    ``dh``: fp32 rows ``r0:r1`` of dL/dhidden (``[r1 - r0, K]``); ``dw``: fp32 rows ``v0:v1`` of dL/dweight;
    ``db``: fp32 ``[V]``. Each is added to (atomics).
    """
    (h, w, b), (oh, ow, ob) = side.own, side.other
    is_kl = kind == "kl"
    n, v, k = r1 - r0, w.shape[0], h.shape[1]
    if n == 0:
        return
    h = h[r0:r1]
    oh = h if oh is None else oh[r0:r1]
    ow = w if ow is None else ow
    kl, c_a, log_s_a, c_b, log_s_b = (r[r0:r1] for r in rows)
    bm, bv, bk, n_split, cols = _head_blocks(h, n, v1 - v0, blocks)
    _k(h)._head_bwd_kernel[(-(-n // bm), n_split)](
        h, w, _or(b, h), oh, ow, _or(ob, h), _or(mask, h), t[r0:r1] if not is_kl else h,
        c_a, log_s_a, c_b, log_s_b, kl, g[r0:r1], _or(dh, h), _or(dw, h), _or(db, h),
        n, v, k, oh.shape[1], h.stride(0), w.stride(0), oh.stride(0), ow.stride(0),
        inv_temp, cols, v0, v1,
        IS_KL=is_kl, TARGET_FIRST=side.target_first, HAS_BIAS=b is not None,
        HAS_RBIAS=is_kl and ob is not None, HAS_BLOCKED=mask is not None,
        NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, IEEE=h.dtype == torch.float32, DOT_F32=_dot_f32(h),
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **_launch(h, HEAD_NUM_WARPS),
    )


def _dot_f32(h: torch.Tensor) -> bool:
    """Upcast bf16/fp16 tiles before ``tl.dot`` in the interpreter (its half-precision dot is wrong; Triton 3.9)."""
    return interpreting() and h.dtype != torch.float32


def _or(x, default):
    return default if x is None else x


def head(kind, h, w, b, ref, t, blocked, inv_temp, with_entropy, policy_first, blocks=None):
    """The fused head in Triton: ``(out, entropy)`` as ``fused._FusedHead.apply`` returns them.

    ``ref``: ``(ref_hidden, ref_weight, ref_bias)`` for the KL (each gets its gradient when it requires
    one), None for the log-probs. ``blocks``: tile sizes and vocabulary split (``BLOCK_M``, ``BLOCK_V``,
    ``BLOCK_K``, ``n_split``; ``range_cols``, ``dh_rows``: the backward's chunks) for tests.
    """
    rh, rw, rb = ref if ref is not None else (None, None, None)
    shared = ref is not None and rw is w
    return _Head.apply(kind, h, w, b, rh, rw, rb, t, blocked, inv_temp, with_entropy, policy_first, shared, blocks)
