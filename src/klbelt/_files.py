"""Crash-safe file replacement, shared by every layer that writes files (no torch here).

:func:`atomic_write` writes a temporary ``.NAME.tmp-PID`` beside the target,
fsyncs it, renames it over the target and fsyncs the directory: a crash at any
point leaves the old file or the new one, never half of one.
:func:`remove_stale_temps` removes the temporary files of killed writers.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
from pathlib import Path

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class WriteError(OSError):
    """A file could not be written (full disk, read-only, ...); the previous version is unchanged."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (the previous version, if any, is unchanged)"


def _write_error(path: Path, exc: OSError) -> WriteError:
    if isinstance(exc, WriteError):
        return exc
    return WriteError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))


# --- Test hook: fault injection (off, and free, unless KLBELT_FAULT is set) -------------------
# KLBELT_FAULT="atomic-write:NAME:POINT:N" makes the process SIGKILL itself at POINT of its
# N-th atomic write of a file called NAME (e.g. "atomic-write:checkpoint.pt:after-fsync:2").
# POINT: "mid-write" (part of the temporary file written), "after-fsync" (temporary file
# complete and synced, not renamed), "after-rename" (renamed, directory not yet synced).
# tests/test_faults.py uses it to kill runs inside checkpoint writes. Unset, it costs one
# environment lookup per atomic write.
FAULT_POINTS = ("mid-write", "after-fsync", "after-rename")


@functools.lru_cache(maxsize=4)
def _parse_fault(spec: str):
    parts = spec.split(":")
    if len(parts) != 4 or parts[0] != "atomic-write" or parts[2] not in FAULT_POINTS or not parts[3].isdigit():
        raise ValueError(f"KLBELT_FAULT={spec!r}: expected 'atomic-write:NAME:POINT:N' with POINT one of {FAULT_POINTS}")
    return parts[1], parts[2], int(parts[3])


_fault_counts: dict[str, int] = {}


def _fault_here(fault, path: Path, point: str) -> bool:
    """True when KLBELT_FAULT names this write and point (writes are counted per file name)."""
    name, at, nth = fault
    return path.name == name and at == point and _fault_counts.get(name, 0) == nth


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _File:
    """The temporary file as handed to the writer: keeps the OSError a write raised
    (``torch.save`` swallows it into an opaque RuntimeError) and hosts the mid-write fault."""

    def __init__(self, f, die_mid_write: bool):
        self._f, self.error, self._die_mid_write = f, None, die_mid_write

    def write(self, data):
        if self._die_mid_write:
            view = memoryview(data) if not isinstance(data, str) else data
            self._f.write(view[: max(1, len(view) // 2)])
            self._f.flush()
            _die()
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | Path, mode: str, write) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename over it.

    A crash at any point leaves either the old file or the new one, never half of one
    (and at most a ``.NAME.tmp-PID`` file, see :func:`remove_stale_temps`). A failed
    write (e.g. a full disk) raises :class:`WriteError` naming ``path``, removes the
    temporary file and leaves the old file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    spec = os.environ.get("KLBELT_FAULT")
    fault = _parse_fault(spec) if spec else None
    if fault is not None:
        _fault_counts[path.name] = _fault_counts.get(path.name, 0) + 1
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            file = _File(f, fault is not None and _fault_here(fault, path, "mid-write"))
            try:
                write(file)
            except Exception as exc:
                if file.error is not None and exc is not file.error:
                    raise file.error from exc
                raise
            f.flush()
            os.fsync(f.fileno())
        if fault is not None and _fault_here(fault, path, "after-fsync"):
            _die()
        os.replace(tmp, path)
        if fault is not None and _fault_here(fault, path, "after-rename"):
            _die()
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` files (and folders) that killed writers left in ``directory``; return them.

    A file is stale when its PID is not a running process, or is this process (call
    this before writing, e.g. at the start of a run). Temporary files of live processes
    are left alone. A missing directory holds nothing to remove.
    """
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_PATTERN.match(entry.name)
        if not m or not (entry.is_file() or entry.is_dir()):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            if entry.is_dir():
                import shutil

                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return False
    return True
