"""A dependency-free progress line for training commands."""

from __future__ import annotations

import sys
import time


class Progress:
    """``step 12/150 [####......] reward 0.12  KL 0.034 nats/tok  beta 0.100  1.1 s/step  ETA 2:30``.

    Redrawn in place on a terminal; on a pipe, one line every ``every`` steps.
    """

    def __init__(self, total: int, label: str = "", stream=None, every: int = 10, width: int = 20):
        self.total, self.label, self.every, self.width = total, label, every, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0

    def __call__(self, record: dict) -> None:
        self.done += 1
        step = record["step"] + 1
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / self.done
        eta = per_step * (self.total - step)
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"{self.label}step {step:>4}/{self.total} [{bar}] reward {record['reward']:+.3f}  "
            f"KL {record['kl']:.4f} nats/tok  beta {record['kl_coef']:.3f}  "
            f"{per_step:.2f} s/step  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or self.done == 1:
            self.stream.write(line + "\n")
            self.stream.flush()
