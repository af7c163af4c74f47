"""Row-wise kernels over ``[N, V]`` logits, and when to compile them.

Every kernel reads a block of logit rows once, upcasts it to fp32 inside the
computation and returns per-row results (or, in backward, the gradient block).
Under ``torch.compile`` each kernel becomes one fused loop over the vocabulary
with no ``[N, V]`` intermediate; in eager mode the callers feed row chunks so
the fp32 temporaries stay small. On a CPU the cost is the ``exp`` throughput,
which is why the exact KL is written with two exponentials per element, not
three.

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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprob_fwd(x: torch.Tensor, t: torch.Tensor, inv_temp: float):
    """log softmax(x * inv_temp)[t] and the row log-sum-exp."""
    xs = x.to(acc_dtype(x.dtype)) * inv_temp
    lse = torch.logsumexp(xs, dim=-1)
    picked = xs.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return picked - lse, lse


def logprob_bwd(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, inv_temp: float):
    """d/dx of sum_i g_i log softmax(x_i * inv_temp)[t_i] = g * inv_temp * (onehot(t) - p)."""
    xs = x.to(acc_dtype(x.dtype)) * inv_temp
    gs = (g * inv_temp).unsqueeze(-1)
    p = torch.exp(xs - lse.unsqueeze(-1))
    onehot = torch.arange(x.shape[-1], device=x.device).unsqueeze(0) == t.unsqueeze(-1)
    return (gs * (onehot.to(p.dtype) - p)).to(x.dtype)


def kl_fwd(a: torch.Tensor, b: torch.Tensor, inv_temp: float):
    """KL(softmax(a*s) || softmax(b*s)) per row, with the two row log-sum-exps.

    With e = exp(a*s - m_a), S = sum e:  KL = sum(e * (a - b) * s) / S - lse_a + lse_b.
    Zero-probability entries of ``a`` contribute 0 (also where both are -inf).
    """
    as_ = a.to(acc_dtype(a.dtype)) * inv_temp
    bs = b.to(acc_dtype(a.dtype)) * inv_temp
    m_a = as_.amax(dim=-1, keepdim=True)
    e = torch.exp(as_ - m_a)
    s = e.sum(dim=-1)
    w = torch.where(e > 0, e * (as_ - bs), 0.0).sum(dim=-1)
    lse_a = m_a.squeeze(-1) + torch.log(s)
    lse_b = torch.logsumexp(bs, dim=-1)
    return w / s - lse_a + lse_b, lse_a, lse_b


def kl_bwd(a, b, lse_a, lse_b, kl, g, inv_temp: float, need_a: bool, need_b: bool):
    """Gradients of sum_i g_i KL(p_i || q_i), p = softmax(a*s), q = softmax(b*s).

    dKL/da = s * p * (log p - log q - KL),   dKL/db = s * (q - p).
    """
    as_ = a.to(acc_dtype(a.dtype)) * inv_temp
    bs = b.to(acc_dtype(a.dtype)) * inv_temp
    gs = (g * inv_temp).unsqueeze(-1)
    logp = as_ - lse_a.unsqueeze(-1)
    logq = bs - lse_b.unsqueeze(-1)
    p = torch.exp(logp)
    ga = gb = None
    if need_a:
        ga = (gs * torch.where(p > 0, p * (logp - logq - kl.unsqueeze(-1)), 0.0)).to(a.dtype)
    if need_b:
        gb = (gs * (torch.exp(logq) - p)).to(b.dtype)
    return ga, gb


_KERNELS = {"logprob_fwd": logprob_fwd, "logprob_bwd": logprob_bwd, "kl_fwd": kl_fwd, "kl_bwd": kl_bwd}


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
