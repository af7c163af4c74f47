"""Crash-safe files: atomic replace for checkpoints, fsynced appends for metrics.

Every file the trainer writes is either replaced atomically (``klbelt._files.atomic_write``:
a temporary ``.NAME.tmp-PID`` beside it, fsync, rename, fsync of the directory)
or is an append-only JSONL log whose last line, if a kill cut it, is dropped on
read and trimmed on resume. A process killed mid-write can leave a temporary
file behind; :func:`remove_stale_temps` (called by :func:`check_writable`, so at
the start of every run) removes those of dead processes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .._files import FAULT_POINTS, WriteError, _fsync_dir, _write_error, atomic_write, remove_stale_temps

__all__ = ["FAULT_POINTS", "WriteError", "atomic_torch_save", "atomic_write", "atomic_write_text", "check_writable",
           "JsonlLog", "read_jsonl", "remove_stale_temps", "save_pretrained_atomic"]


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written checkpoint."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the text file ``path`` (UTF-8) atomically."""
    atomic_write(path, "w", lambda f: f.write(text))


def save_pretrained_atomic(model, tokenizer, directory: str | Path) -> None:
    """``save_pretrained`` of a model and its tokenizer into ``directory``, swapped in whole.

    Written into ``.NAME.tmp-PID`` first, then renamed into place (the previous
    folder is moved aside and removed): a kill leaves the old folder or the new
    one, or, between the two renames, none plus temporaries that
    :func:`remove_stale_temps` clears; never a folder with half the files.
    """
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    except OSError as exc:
        raise _write_error(directory, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a last line cut by a crash is dropped with a warning."""
    path = Path(path)
    records = []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: last line is incomplete (cut by a crash?); read up to it", RuntimeWarning)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


class JsonlLog:
    """Append-only JSONL, one flushed line per record (a killed process loses none).

    A kill mid-append can leave a cut last line: :func:`read_jsonl` drops it and
    :meth:`keep_steps_before` (called on resume) rewrites the file without it.
    ``sync()`` also forces the lines to disk (against power loss); the trainer
    calls it before each checkpoint so no checkpoint is ever ahead of its metrics.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def sync(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)  # the file's own directory entry, once it is new

    def keep_steps_before(self, step: int) -> None:
        """Drop records with ``step >= step`` (written after the checkpoint being resumed) and a cut last line."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", -1) < step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def check_writable(directory: str | Path, need_bytes: int = 64 << 20) -> None:
    """Fail before training when ``directory`` cannot be created, written, or is nearly full.

    Also removes temporary files that killed writers left there (:func:`remove_stale_temps`).
    Raises ``ValueError`` with one line naming the directory.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(directory)
        probe = directory / f".write-test.tmp-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
        st = os.statvfs(directory)
    except OSError as exc:
        raise ValueError(f"output directory {directory}: not writable ({exc.strerror or exc})") from None
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise ValueError(
            f"output directory {directory}: only {free / 2**20:.1f} MiB free, need at least {need_bytes / 2**20:.0f} MiB"
        )
