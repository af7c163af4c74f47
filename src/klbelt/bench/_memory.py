"""Extra peak memory of one call, measured from the process's resident memory.

Definition used by ``klbelt bench kernels``::

    extra peak = peak RSS during the call - RSS just before it - bytes the call returns

measured in a fresh Python process per benchmark run, after the inputs are
allocated and touched and after one warm-up call of the same implementation
(so compilation, lazily loaded code and thread pools are already paid for).
"Bytes the call returns" are the tensors any implementation must produce: the
``[N]`` result and, for forward+backward, the gradient with respect to the
policy logits (``[N, V]`` in their dtype). Clamped at 0.

Why resident memory and not an allocator counter: it sees every byte that
touches RAM (ATen, inductor's buffers, Python), whatever allocates it. Two
things keep it honest. The peak is reset right before the call by writing
``5`` to ``/proc/self/clear_refs`` (Linux), which sets ``VmHWM`` back to the
current ``VmRSS``. And the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` and
``MALLOC_TRIM_THRESHOLD_=0``, so glibc serves every block of 64 KiB or more
with ``mmap`` and gives it back on free: memory freed by the warm-up call
cannot be silently reused (and so hidden) by the measured one. Where the
peak cannot be reset (not Linux) the result is ``None``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import time

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Set the peak resident size (VmHWM) back to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_is_resettable() -> bool:
    """Whether :func:`reset_peak` works here: a freed 64 MiB block must leave the peak after a reset."""
    try:
        import torch

        block = torch.ones(1 << 24)  # 64 MiB, touched
        del block
        before = _status_kib("VmHWM")
        reset_peak()
        return _status_kib("VmHWM") < before - (32 << 10)
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def extra_peak_bytes(call) -> int:
    """Extra peak resident memory of ``call()`` (returns a tuple of tensors), per the module docstring."""
    outputs = call()  # warm-up: compile, load code, start threads
    del outputs
    gc.collect()
    reset_peak()
    before = _status_kib("VmRSS")
    outputs = call()
    peak = _status_kib("VmHWM")
    kept = tensor_bytes(outputs)
    del outputs
    gc.collect()
    return max(0, (peak - before) * 1024 - kept)


def reset_peak_kib() -> int | None:
    """Reset the resident high-water mark; the resident KiB now, or None where unsupported.

    Memory freed between the reset and the check makes the check fail; retry a few times.
    """
    for _ in range(10):
        try:
            reset_peak()
            hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
        except OSError:
            return None
        if hwm <= rss + 64:
            return rss
        time.sleep(0.01)
    return None


def peak_growth_mb(rss_before_kib: int | None) -> float | None:
    """MB the resident high-water mark rose above ``rss_before_kib`` (from :func:`reset_peak_kib`)."""
    return None if rss_before_kib is None else max(0, _status_kib("VmHWM") - rss_before_kib) / 1024


def measure_in_child(spec: dict, child: str) -> dict:
    """Run ``child`` ("module:function", called with ``spec``) in a fresh process with the allocator
    settings above; the JSON result it returns. The caller names the function, so this module imports
    no benchmark back."""
    env = dict(os.environ, **CHILD_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "klbelt.bench._memory", child],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(child: str) -> int:
    """Call ``child`` on the spec (JSON on stdin); print its JSON result."""
    module, _, name = child.partition(":")
    spec = json.loads(sys.stdin.read())
    results = getattr(importlib.import_module(module), name)(spec)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1]))
