"""The training progress bar: tqdm (a widget in notebooks), off when not on a terminal or with TQDM_DISABLE=1."""

from __future__ import annotations

import os
import sys


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is not a terminal but a bar still renders)."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def enabled(stream) -> bool:
    """Show a bar? Not with TQDM_DISABLE set to anything but 0/false, and only on a terminal or in a notebook."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return in_notebook() or (hasattr(stream, "isatty") and stream.isatty())


class Progress:
    """``on_step`` callback drawing ``step 12/150 |####  | reward +0.12, KL 0.034 nats/tok, beta 0.100``.

    Uses ``tqdm.auto`` (a widget in notebooks); without tqdm installed, or when
    not enabled (see :func:`enabled`), it draws nothing.
    """

    def __init__(self, total: int, label: str = "", stream=None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled(self.stream):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=(label.strip() or "step"), file=self.stream, unit="update",
                            dynamic_ncols=True, leave=True, disable=False)

    def __call__(self, record: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"reward {record['reward']:+.3f}, KL {record['kl']:.4f} nats/tok, beta {record['kl_coef']:.3f}", refresh=False)
        self.bar.update(record["step"] + 1 - self.bar.n)
        if record["step"] + 1 >= self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
