"""The run's device: checked once, before any model loads, and what a CUDA run may use.

``check_device`` turns ``TrainConfig.device`` into a ``torch.device`` and refuses one
this machine cannot run (``"cuda"`` without a usable GPU, an index past the last GPU)
with an error naming ``device``; the command line calls it before loading the model
and ``train()`` again before moving one. ``cuda_graphs_unavailable`` says why a CUDA
run cannot capture CUDA graphs for its sampler (``None`` when it can); the sampler
then decodes without them, after one warning naming the reason.
"""

from __future__ import annotations

import os

import torch

GRAPHS_OFF_ENV = "KLBELT_NO_CUDA_GRAPHS"  # set to 1: CUDA runs decode without CUDA graphs


def check_device(device) -> torch.device:
    """``device`` (``TrainConfig.device``) as a ``torch.device`` this machine can run; else ``ValueError`` naming it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"config device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r} ({exc})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(f"config device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"{built}, {torch.cuda.device_count()} GPU(s) visible); use device 'cpu'")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"config device {device!r}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    return parsed


def cuda_graphs_unavailable(device: torch.device) -> str | None:
    """Why the sampler cannot replay CUDA graphs on ``device``, or ``None`` when it can."""
    if device.type != "cuda":
        return f"device is {device.type!r}, not CUDA"
    if os.environ.get(GRAPHS_OFF_ENV, "") not in ("", "0"):
        return f"${GRAPHS_OFF_ENV} is set"
    if not hasattr(torch.cuda, "CUDAGraph"):
        return f"torch {torch.__version__} has no torch.cuda.CUDAGraph"
    return None
