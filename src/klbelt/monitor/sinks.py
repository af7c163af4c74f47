"""Where step records go: JSONL (the default), CSV, TensorBoard event files.

A sink has ``write(record)``, ``alert(alert)`` and ``close()``. Records are flat
dicts of Python numbers (``kl_hist`` is a list) as :class:`KLMonitor` makes them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path


def _scalar_items(record):
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            yield k, float(v)


class JSONLSink:
    """One JSON object per line, flushed every step so a crash loses at most the line being written.

    Alerts are written as a list under ``"alerts"`` in the record of the step that raised them.
    """

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, separators=(",", ":")) + "\n")
        self._file.flush()

    def alert(self, alert) -> None:  # alerts travel inside the record
        pass

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class CSVSink:
    """A CSV file of the scalar metrics; a column that appears late rewrites the file with it."""

    def __init__(self, path, keep_steps_before: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] = ["step"]
        self._rows: list[dict] = []
        if keep_steps_before and self.path.is_file():  # a resumed run: keep the rows before its checkpoint
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or ["step"])
                self._rows = [row for row in reader if row.get("step") not in (None, "")
                              and int(float(row["step"])) < keep_steps_before]
            self._rewrite()

    def write(self, record: dict) -> None:
        row = {"step": record.get("step")}
        row.update(dict(_scalar_items(record)))
        if record.get("alerts"):
            row["alerts"] = ";".join(record["alerts"])
        self._rows.append(row)
        new = [k for k in row if k not in self._columns]
        if new or len(self._rows) == 1:
            self._columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self._columns).writerow(row)

    def _rewrite(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.path)

    def alert(self, alert) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files under ``log_dir``: scalars as ``klbelt/<metric>``, alerts as text.

    Needs the ``tensorboard`` package (``pip install klbelt[monitor]``).
    """

    def __init__(self, log_dir, prefix: str = "klbelt/", purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoardSink needs tensorboard: pip install 'klbelt[monitor]'") from e
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        # purge_step (a resumed run): TensorBoard hides the earlier files' events from that step on
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step or None)
        self._step = 0

    def write(self, record: dict) -> None:
        self._step = int(record.get("step", self._step + 1))
        for k, v in _scalar_items(record):
            if math.isfinite(v):
                self._writer.add_scalar(self.prefix + k, v, self._step)
        self._writer.flush()

    def alert(self, alert) -> None:
        self._writer.add_text(self.prefix + "alerts", alert.line(), alert.step)

    def close(self) -> None:
        self._writer.close()


SINKS = {"jsonl": (JSONLSink, "metrics.jsonl"), "csv": (CSVSink, "metrics.csv"), "tensorboard": (TensorBoardSink, "tb")}


def make_sink(kind, log_dir, start: int = 0):
    """A sink object from a name (``"jsonl"``, ``"csv"``, ``"tensorboard"``, ``"wandb"``, ``"mlflow"``) under ``log_dir``.

    ``start > 0``: the run resumes at step ``start``: csv keeps its rows before
    it, TensorBoard purges the later steps, W&B and MLflow continue the same run.
    """
    if not isinstance(kind, str):
        return kind
    if kind in ("wandb", "mlflow"):  # klbelt.monitor.external: W&B run under log_dir / MLflow store log_dir/mlruns
        from . import external

        return (external.WandbSink if kind == "wandb" else external.MLflowSink)(log_dir, resume_step=start or None)
    if kind not in SINKS:
        raise ValueError(f"sinks must hold sink objects or names from {tuple(SINKS) + ('wandb', 'mlflow')}, got {kind!r}")
    if log_dir is None:
        raise ValueError(f"log_dir is needed for the {kind!r} sink (where its file goes)")
    cls, name = SINKS[kind]
    if start and kind == "csv":
        return cls(Path(log_dir) / name, keep_steps_before=start)
    if start and kind == "tensorboard":
        return cls(Path(log_dir) / name, purge_step=start)
    return cls(Path(log_dir) / name)
