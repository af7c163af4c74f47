"""Argument checks shared by every public function (docs/design.md, "What bad input gets").

Each check raises a ``TypeError`` (wrong kind of object or dtype) or a
``ValueError`` (wrong shape or value) whose message names the argument, what it
got and what was expected. Checks on tensor *values* (finite, in range) run
synchronously on the CPU; on an accelerator they are queued with
``torch._assert_async`` so they never force a host-device sync in a hot path.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Iterable

import torch


def _describe(x: torch.Tensor) -> str:
    return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"


def tensor(name: str, x, *, floating: bool = False, integer: bool = False) -> torch.Tensor:
    """Check ``x`` is a tensor (of a floating or integer dtype when asked)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {_describe(x)}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype (int64, int32, ...), got {_describe(x)}")
    return x


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def min_dim(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimensions ({layout}), got shape {tuple(x.shape)}")


def require(cond: torch.Tensor, exc: type[Exception], message: str) -> None:
    """Raise ``exc(message)`` unless the boolean tensor ``cond`` holds.

    On CPU this is an ordinary check. On other devices it is queued as a
    device-side assertion so the caller's stream is not synchronised.
    """
    if cond.device.type == "cpu":
        if not bool(cond):
            raise exc(message)
    else:
        torch._assert_async(cond, message)


def finite(name: str, x: torch.Tensor) -> None:
    if x.numel():
        require(torch.isfinite(x).all(), ValueError, f"{name} contains NaN or infinite values")


def logprob_values(name: str, x: torch.Tensor, atol: float = 1e-4) -> None:
    """Log-probabilities are finite and <= 0 (up to rounding ``atol``)."""
    if x.numel():
        finite(name, x)
        require(
            (x <= atol).all(),
            ValueError,
            f"{name} must hold log-probabilities (<= 0); got a value above 0, "
            "did you pass logits or probabilities instead?",
        )


def mask_like(name: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Check a 0/1 (or bool) mask of ``ref``'s shape; return it as ``ref``'s dtype."""
    tensor(name, mask)
    if mask.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"{name} must be bool or hold 0/1 values, got {_describe(mask)}")
        if mask.numel():
            require(((mask == 0) | (mask == 1)).all(), ValueError, f"{name} must hold only 0 and 1 (or be bool)")
    return mask.to(ref.dtype)


def choice(name: str, value, valid: Iterable[str]) -> str:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(repr(v) for v in valid)}; got {value!r}")
    return value


def scalar(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float | torch.Tensor:
    """A finite real number (Python or 0-d tensor), optionally > 0 or >= 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a one-element tensor, got {_describe(value)}")
        checked = value.detach().reshape(())
        cond = torch.isfinite(checked)
        if positive:
            cond = cond & (checked > 0)
        elif nonnegative:
            cond = cond & (checked >= 0)
        what = "a finite number > 0" if positive else "a finite number >= 0" if nonnegative else "a finite number"
        require(cond, ValueError, f"{name} must be {what}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def chunk_rows(name: str, chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{name} must be a positive int (rows per chunk) or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"{name} must be a positive int (rows per chunk) or None, got {chunk_size}")
    return chunk_size
