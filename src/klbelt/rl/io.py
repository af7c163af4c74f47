"""Crash-safe files: atomic replace for checkpoints, fsynced appends for metrics."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, mode: str, write) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename over it.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written checkpoint."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a last line cut by a crash is dropped with a warning."""
    path = Path(path)
    records = []
    lines = path.read_text().splitlines()
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

    ``sync()`` also forces the lines to disk (against power loss); the trainer
    calls it before each checkpoint so no checkpoint is ever ahead of its metrics.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        if self.path.exists():
            with open(self.path, "rb+") as f:
                os.fsync(f.fileno())

    def keep_steps_before(self, step: int) -> None:
        """Drop records with ``step >= step`` (written after the checkpoint being resumed)."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", -1) < step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def check_writable(directory: str | Path, need_bytes: int = 64 << 20) -> None:
    """Fail before training when ``directory`` cannot be created, written, or is nearly full."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output directory {directory}: not writable ({exc.strerror or exc})") from None
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    if free < need_bytes:
        raise ValueError(f"output directory {directory}: only {free >> 20} MiB free, need at least {need_bytes >> 20} MiB")
