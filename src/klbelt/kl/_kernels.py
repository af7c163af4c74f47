"""Row-wise kernels over ``[N, V]`` logits, and when to compile them.

Every kernel reads a block of logit rows, upcasts it to fp32 inside the
computation (fp64 stays fp64) and returns per-row results (or, in backward,
the gradient block). Under ``torch.compile`` each kernel becomes one fused loop
over the vocabulary with no ``[N, V]`` intermediate; in eager mode the callers
feed row chunks so the fp32 temporaries stay small.

On a CPU the cost is the ``exp`` throughput plus the passes over memory, so
the forward kernels used there (``*_fwd_one_pass``) read the logits once: a
softmax needs *some* shift ``c`` with ``exp(x - c)`` in range, not the row
maximum. The shift is the largest of a strided sample of the row (it is an
element of the row, so the sum is >= 1 and never underflows); a row whose sum
overflows anyway (its maximum is ~80 nats above the shift) comes out
non-finite and is recomputed with the exact two-pass kernel (``*_fwd``:
maximum first, then the sum). On other devices, where that
check would synchronise the host, the two-pass kernels are used directly. The
exact KL takes two exponentials per element (one per distribution), the
minimum.

Backends (``set_backend`` or the ``KLBELT_KERNELS`` environment variable):
``"auto"`` (default) compiles for inputs of at least ``COMPILE_MIN_NUMEL``
elements and falls back to eager, with one warning, if compilation fails;
``"compile"`` always compiles; ``"eager"`` never does.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import torch

COMPILE_MIN_NUMEL = 1 << 22  # below ~4M logits compilation does not pay for itself
EAGER_CHUNK_NUMEL = 1 << 20  # fp32 temporaries of 4 MB per eager chunk

_BACKENDS = ("auto", "compile", "eager")
_backend = os.environ.get("KLBELT_KERNELS", "auto")
if _backend not in _BACKENDS:  # pragma: no cover - environment misconfiguration
    raise ValueError(f"KLBELT_KERNELS must be one of {', '.join(_BACKENDS)}; got {_backend!r}")
_compiled: dict[str, Callable] = {}
_compile_broken = False
compile_seconds: dict[str, float] = {}  # first-call (compile) time per kernel, for the benchmark


def set_backend(backend: str) -> None:
    """Choose how kernels run: ``"auto"``, ``"compile"`` or ``"eager"``."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in _BACKENDS)}; got {backend!r}")
    _backend = backend


def get_backend() -> str:
    return _backend


# --------------------------------------------------------------------------- kernels
# All take 2-D blocks: x, y [n, V] logits (any float dtype), t [n] int64 tokens,
# inv_temp a Python float; per-row outputs are fp32 [n] (fp64 for fp64 logits).
# A row's log-sum-exp is kept as two numbers, a shift c (an element of the
# scaled row) and log_s = log sum exp(x*s - c), never added: differences such
# as x_t*s - c are then exact even for logits offset by 1e4, where c + log_s
# would round to ~1e-3.

PIVOT_SAMPLES = 64  # row entries sampled (strided) for the one-pass shift


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(x: torch.Tensor, inv_temp: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x * inv_temp`` in the accumulation dtype of ``x`` (of ``like`` when given)."""
    return x.to(acc_dtype((x if like is None else like).dtype)) * inv_temp


def _max_shift(xs: torch.Tensor) -> torch.Tensor:
    """``[n, 1]`` row maximum of the scaled rows (two-pass kernels)."""
    return xs.amax(dim=-1, keepdim=True)


def _sample_shift(x: torch.Tensor, inv_temp: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 1]`` shift for the one-pass kernels: the largest of a strided sample of each scaled row.

    It is an element of the row, scaled exactly as the kernels scale every
    element, so ``exp(x*s - shift)`` is 1 there and the row sum is >= 1. (It is
    a reduction on purpose: the compiled kernel then loads it once per row
    instead of recomputing it inside the loop over the vocabulary.)
    """
    step = max(1, x.shape[-1] // PIVOT_SAMPLES)
    return _scaled(x[:, ::step], inv_temp, like).amax(dim=-1, keepdim=True)


def _logprob_fwd(x, t, inv_temp, one_pass: bool):
    xs = _scaled(x, inv_temp)
    c = _sample_shift(x, inv_temp) if one_pass else _max_shift(xs)
    log_s = torch.log(torch.exp(xs - c).sum(dim=-1, keepdim=True))
    picked = _scaled(x.gather(-1, t.unsqueeze(-1)), inv_temp)
    return ((picked - c) - log_s).squeeze(-1), c.squeeze(-1), log_s.squeeze(-1)


def logprob_fwd(x: torch.Tensor, t: torch.Tensor, inv_temp: float):
    """log softmax(x*s)[t] with s = inv_temp, and the row's (c, log_s): lse = c + log_s.

    Two passes: c = row max, then log_s = log sum exp(x*s - c).
    """
    return _logprob_fwd(x, t, inv_temp, one_pass=False)


def logprob_fwd_one_pass(x: torch.Tensor, t: torch.Tensor, inv_temp: float):
    """As :func:`logprob_fwd` in one pass over ``x``, with c from :func:`_sample_shift`.

    Non-finite for a row whose sum overflows; the caller recomputes those rows.
    """
    return _logprob_fwd(x, t, inv_temp, one_pass=True)


def logprob_bwd(
    x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, log_s: torch.Tensor,
    g: torch.Tensor, inv_temp: float,
):
    """d/dx of sum_i g_i log softmax(x_i*s)[t_i] = g * s * (onehot(t) - p),  p = exp(x*s - c - log_s).

    Written as ``-g*s*p`` everywhere, then the chosen entries are overwritten
    with ``g*s*(1 - p_t) = -g*s*expm1(log p_t)`` (accurate also where p_t ~ 1,
    one rounding): cheaper than a one-hot compare per element.
    """
    gs = (g * inv_temp).unsqueeze(-1)
    c, log_s = c.unsqueeze(-1), log_s.unsqueeze(-1)
    grad = (-gs * torch.exp((_scaled(x, inv_temp) - c) - log_s)).to(x.dtype)
    idx = t.unsqueeze(-1)
    picked = -gs * torch.expm1((_scaled(x.gather(-1, idx), inv_temp) - c) - log_s)
    return grad.scatter_(-1, idx, picked.to(x.dtype))


def _kl_fwd(a, b, inv_temp, one_pass: bool):
    as_, bs = _scaled(a, inv_temp), _scaled(b, inv_temp, like=a)
    if one_pass:
        c_a, c_b = _sample_shift(a, inv_temp), _sample_shift(b, inv_temp, like=a)
    else:
        c_a, c_b = _max_shift(as_), _max_shift(bs)
    da, db = as_ - c_a, bs - c_b
    e = torch.exp(da)
    s_a = e.sum(dim=-1)
    w = torch.where(e > 0, e * (da - db), 0.0).sum(dim=-1)
    log_s_a = torch.log(s_a)
    log_s_b = torch.log(torch.exp(db).sum(dim=-1))
    return w / s_a - log_s_a + log_s_b, c_a.squeeze(-1), log_s_a, c_b.squeeze(-1), log_s_b


def kl_fwd(a: torch.Tensor, b: torch.Tensor, inv_temp: float):
    """KL(softmax(a*s) || softmax(b*s)) per row, with each row's (c_a, log_s_a, c_b, log_s_b).

    With da = a*s - c_a, db = b*s - c_b, e = exp(da), S_a = sum e, S_b = sum exp(db):
    KL = sum(e * (da - db)) / S_a - log S_a + log S_b. Two passes (c = row max).
    Zero-probability entries of ``a`` contribute 0 (also where both are -inf).
    """
    return _kl_fwd(a, b, inv_temp, one_pass=False)


def kl_fwd_one_pass(a: torch.Tensor, b: torch.Tensor, inv_temp: float):
    """As :func:`kl_fwd` in one pass over ``a`` and ``b``, with shifts from :func:`_sample_shift`.

    Non-finite for a row whose sums overflow; the caller recomputes those rows.
    """
    return _kl_fwd(a, b, inv_temp, one_pass=True)


def kl_bwd(a, b, c_a, log_s_a, c_b, log_s_b, kl, g, inv_temp: float, need_a: bool, need_b: bool):
    """Gradients of sum_i g_i KL(p_i || q_i), p = softmax(a*s), q = softmax(b*s).

    dKL/da = s * p * (log p - log q - KL),   dKL/db = s * (q - p),
    with log p = a*s - c_a - log_s_a and log q = b*s - c_b - log_s_b.
    """
    gs = (g * inv_temp).unsqueeze(-1)
    logp = (_scaled(a, inv_temp) - c_a.unsqueeze(-1)) - log_s_a.unsqueeze(-1)
    logq = (_scaled(b, inv_temp, like=a) - c_b.unsqueeze(-1)) - log_s_b.unsqueeze(-1)
    p = torch.exp(logp)
    ga = gb = None
    if need_a:
        ga = (gs * torch.where(p > 0, p * (logp - logq - kl.unsqueeze(-1)), 0.0)).to(a.dtype)
    if need_b:
        gb = (gs * (torch.exp(logq) - p)).to(b.dtype)
    return ga, gb


_KERNELS = {
    "logprob_fwd": logprob_fwd,
    "logprob_fwd_one_pass": logprob_fwd_one_pass,
    "logprob_bwd": logprob_bwd,
    "kl_fwd": kl_fwd,
    "kl_fwd_one_pass": kl_fwd_one_pass,
    "kl_bwd": kl_bwd,
}


# --------------------------------------------------------------------------- dispatch


def _want_compile(numel: int) -> bool:
    if _compile_broken or _backend == "eager":
        return False
    if torch.compiler.is_compiling():  # the caller is compiling us: trace the eager code
        return False
    return _backend == "compile" or numel >= COMPILE_MIN_NUMEL


def _compiled_kernel(name: str) -> Callable:
    fn = _compiled.get(name)
    if fn is None:
        fn = torch.compile(_KERNELS[name], dynamic=True)
        _compiled[name] = fn
    return fn


def run(name: str, numel: int, *args):
    """Run kernel ``name``: compiled when worthwhile and working, else eager."""
    global _compile_broken
    if _want_compile(numel):
        first = name not in compile_seconds
        start = time.perf_counter()
        try:
            out = _compiled_kernel(name)(*args)
        except Exception as exc:  # no C++ compiler, unsupported device, ...
            if _backend == "compile":
                raise
            _compile_broken = True
            warnings.warn(
                f"klbelt: torch.compile failed ({type(exc).__name__}: {exc}); "
                "using the eager kernels from now on (slower, same results)",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            if first:
                compile_seconds[name] = time.perf_counter() - start
            return out
    return _KERNELS[name](*args)


_N_OUTPUTS = {"logprob": 3, "kl": 5}


def forward(kind: str, rows: tuple[torch.Tensor, ...], inv_temp: float, chunk_size: int | None) -> list[torch.Tensor]:
    """Per-row outputs of the ``kind`` (``"logprob"`` or ``"kl"``) forward over row-aligned 2-D ``rows``.

    On a CPU the one-pass kernel runs over all blocks, then the rows it could
    not finish (a non-finite output) are recomputed by the exact two-pass
    kernel, eagerly and a few rows at a time; a result that is non-finite there
    too (an infinite KL, a NaN logit) is the true result.
    """
    x = rows[0]
    n, v = x.shape
    if n == 0:
        return [torch.empty(0, dtype=acc_dtype(x.dtype), device=x.device) for _ in range(_N_OUTPUTS[kind])]
    one_pass = x.device.type == "cpu"
    name = f"{kind}_fwd_one_pass" if one_pass else f"{kind}_fwd"
    outs: list[torch.Tensor] = []
    for s, e in blocks(n, v, chunk_size):
        res = run(name, n * v, *(r[s:e] for r in rows), inv_temp)
        if s == 0 and e == n:  # one block: keep the kernel's outputs, no copy
            outs = list(res)
            break
        if not outs:
            outs = [torch.empty(n, dtype=r.dtype, device=x.device) for r in res]
        for out, r in zip(outs, res):
            out[s:e] = r
    if one_pass:
        _redo_rows(kind, rows, inv_temp, outs)
    return outs


def _redo_rows(kind: str, rows, inv_temp: float, outs: list[torch.Tensor]) -> None:
    bad = ~torch.isfinite(outs[0])
    for out in outs[1:]:
        bad |= ~torch.isfinite(out)
    idx = bad.nonzero().squeeze(-1)  # host sync: CPU only
    step = rows_per_chunk(idx.numel(), rows[0].shape[-1], None, compiled=False)
    for s in range(0, idx.numel(), step):
        i = idx[s : s + step]
        for out, r in zip(outs, _KERNELS[f"{kind}_fwd"](*(r[i] for r in rows), inv_temp)):
            out[i] = r


def rows_per_chunk(n_rows: int, vocab: int, chunk_size: int | None, compiled: bool) -> int:
    """Rows per block: the caller's choice, else all rows when compiled, else ~4 MB blocks."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    if compiled:
        return max(1, n_rows)
    return max(1, min(n_rows, EAGER_CHUNK_NUMEL // max(vocab, 1)))


def blocks(n_rows: int, vocab: int, chunk_size: int | None):
    """Yield ``(start, stop)`` row blocks sized for the backend in use."""
    compiled = _want_compile(n_rows * vocab)
    step = rows_per_chunk(n_rows, vocab, chunk_size, compiled)
    for start in range(0, n_rows, step):
        if compiled and not _want_compile(n_rows * vocab):  # compilation just failed
            yield from blocks_from(start, n_rows, rows_per_chunk(n_rows, vocab, chunk_size, False))
            return
        yield start, min(start + step, n_rows)


def blocks_from(start: int, n_rows: int, step: int):
    for s in range(start, n_rows, step):
        yield s, min(s + step, n_rows)
