"""Readers that turn a run's log into klbelt's history: a list of ``{"step": ..., metric: value}``.

Supported: klbelt's JSONL, Hugging Face / TRL ``trainer_state.json`` (its
``log_history``), TensorBoard event files (klbelt's or TRL's), and CSV with an
optional column mapping. Foreign metric names are renamed to klbelt's (with
their units, see :data:`klbelt.monitor.METRICS`) by :data:`ALIASES`.

A file that cannot be read raises :class:`RunReadError` whose message is one
line naming the file and the problem.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

from .names import _PREFIXES, ALIASES, Run, RunReadError, canonical_name  # noqa: F401 (re-exported)


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def normalize_logs(logs: dict, step: int | None = None) -> dict | None:
    """A record from one foreign log entry (TRL ``log_history`` item, ``on_log`` dict), or None if it has no metric.

    Evaluation entries (``eval_*``) and the end-of-training summary (``train_runtime``) are skipped.
    """
    if any(k.startswith("eval_") for k in logs) or "train_runtime" in logs:
        return None
    record = {}
    for k, v in logs.items():
        if k in ("step", "epoch"):
            continue
        x = _number(v)
        if x is not None:
            record[canonical_name(k)] = x
    if not record:
        return None
    s = logs.get("step", step)
    record = {"step": int(s) if s is not None else None, **record}
    return record


def _fail(path, problem) -> RunReadError:
    return RunReadError(f"{path}: {problem}")


def read_jsonl(path) -> Run:
    """klbelt's ``metrics.jsonl``, or verl's file logger (``{"step": N, "data": {...}}`` per line).

    A last line cut short by a crash is dropped with a warning."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _fail(path, "not a text file (expected JSON lines)") from None
    records, notes, fmt = [], [], "jsonl"
    content = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for j, (lineno, line) in enumerate(content):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if j == len(content) - 1 and records:
                note = f"{path}: last line {lineno} is cut short (crashed run?); read the {len(records)} steps before it"
                warnings.warn(note, stacklevel=3)
                notes.append(note)
                break
            raise _fail(path, f"line {lineno} is not JSON (expected one JSON object per line)") from None
        if not isinstance(obj, dict) or "step" not in obj:
            raise _fail(path, f"line {lineno} is not a klbelt step record (a JSON object with a 'step' key)")
        if set(obj) == {"step", "data"} and isinstance(obj["data"], dict):  # verl's file logger
            fmt = "verl_jsonl"
            obj = {"step": obj["step"], **{k: v for k, v in obj["data"].items() if _number(v) is not None}}
        records.append({canonical_name(k): v for k, v in obj.items()})
    if not records:
        raise _fail(path, "no step records")
    return Run(path, fmt, records, notes)


def read_trainer_state(path) -> Run:
    """A Hugging Face / TRL ``trainer_state.json``: one record per training ``log_history`` entry."""
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e.__class__.__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise _fail(path, "JSON without a 'log_history' list (not a Hugging Face trainer_state.json)")
    records = [r for r in (normalize_logs(e) for e in state["log_history"] if isinstance(e, dict)) if r]
    for i, r in enumerate(records):
        if r["step"] is None:
            r["step"] = i
    if not records:
        raise _fail(path, "log_history has no training metrics")
    return Run(path, "trainer_state", records)


def read_tensorboard(path) -> Run:
    """TensorBoard event files in ``path`` (a folder, or one event file), read with TensorBoard's own reader."""
    path = Path(path)
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:  # pragma: no cover - depends on the environment
        raise _fail(path, "reading TensorBoard files needs tensorboard: pip install 'klbelt[monitor]'") from None
    folders = [path] if path.is_file() else sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
    if not folders:
        raise _fail(path, "no TensorBoard event files (events.out.tfevents.*) in this folder")
    by_step: dict[int, dict] = {}
    for folder in folders:
        acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
        try:
            acc.Reload()
        except Exception as e:  # tensorboard raises various errors on corrupt files
            raise _fail(folder, f"unreadable TensorBoard event file ({e.__class__.__name__})") from None
        for tag in acc.Tags().get("scalars", []):
            name = canonical_name(tag)
            for ev in acc.Scalars(tag):
                if math.isfinite(ev.value):
                    by_step.setdefault(int(ev.step), {"step": int(ev.step)})[name] = float(ev.value)
    if not by_step:
        raise _fail(path, "TensorBoard event files without scalars")
    return Run(path, "tensorboard", [by_step[s] for s in sorted(by_step)])


def read_csv(path, columns: dict | None = None) -> Run:
    """A CSV with a header row. ``columns`` maps klbelt names to the file's column names
    (e.g. ``{"kl": "train/kl_mean", "step": "global_step"}``); other columns keep their
    (aliased) names. Without a step column, the row number is the step."""
    path = Path(path)
    columns = dict(columns or {})
    rename = {v: k for k, v in columns.items()}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise _fail(path, f"not a readable CSV ({e.__class__.__name__})") from None
    missing = [c for c in columns.values() if c not in header]
    if missing:
        raise _fail(path, f"column(s) {', '.join(missing)} not in the header ({', '.join(header[:12])})")
    if not rows:
        raise _fail(path, "CSV without data rows")
    records = []
    for i, row in enumerate(rows):
        rec = {}
        for col, v in row.items():
            if col is None:
                continue
            name = rename.get(col) or canonical_name(col)
            try:
                x = float(v)
            except (TypeError, ValueError):
                if name == "alerts" and v:
                    rec["alerts"] = v.split(";")
                continue
            if math.isfinite(x):
                rec[name] = x
        step = rec.pop("step", i)
        records.append({"step": int(step), **rec})
    if not any(len(r) > 1 for r in records):
        raise _fail(path, "no numeric metric columns")
    return Run(path, "csv", records)


def read_run(path, columns: dict | None = None) -> Run:
    """Read any supported run log, choosing the reader from the path.

    A folder: its ``metrics.jsonl``, else ``trainer_state.json`` (or the one in its
    latest ``checkpoint-*``), else ``metrics.csv``, else its TensorBoard event files.
    """
    path = Path(path)
    try:
        run = _read_run(path, columns)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if columns and run.format != "csv":  # the CSV reader maps its own columns
        _map_columns(run, columns)
    return run


def _map_columns(run: Run, columns: dict) -> None:
    """Rename ``SOURCE`` (as logged, or its canonical name) to ``NAME`` in every record of ``run``."""
    for name, source in columns.items():
        keys = [k for k in (source, canonical_name(source)) if any(k in r for r in run.records)]
        if not keys:
            raise _fail(run.path, f"--column {name}={source}: no metric {source!r} in this {run.format} log")
        for r in run.records:
            if keys[0] in r:
                value = r.pop(keys[0])
                r[name] = int(value) if name == "step" else value
    if "step" in columns:
        run.records.sort(key=lambda r: r["step"])


def _read_run(path: Path, columns) -> Run:
    if not path.exists():
        raise _fail(path, "no such file or folder")
    if path.is_dir():
        for name, reader in (("metrics.jsonl", read_jsonl), ("trainer_state.json", read_trainer_state)):
            if (path / name).is_file():
                return reader(path / name)
        checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: _ckpt_step(p.parent))
        if checkpoints:
            return read_trainer_state(checkpoints[-1])
        if (path / "metrics.csv").is_file():
            return read_csv(path / "metrics.csv", columns)
        from .external import mlflow_run_dir, read_mlflow, read_wandb, wandb_file

        if wandb_file(path) is not None:
            return read_wandb(path)
        if mlflow_run_dir(path) is not None:
            return read_mlflow(path)
        wandb_named = path.name == "wandb" or path.name.startswith(("offline-run-", "run-"))
        if wandb_named and not any(path.rglob("events.out.tfevents.*")):
            return read_wandb(path)  # a W&B folder without a run: say so, not "no TensorBoard event files"
        if path.name == "mlruns" and not any(path.rglob("events.out.tfevents.*")):
            return read_mlflow(path)
        return read_tensorboard(path)
    name = path.name
    if name.startswith("events.out.tfevents."):
        return read_tensorboard(path)
    if path.suffix == ".csv":
        return read_csv(path, columns)
    if path.suffix == ".wandb":
        from .external import read_wandb

        return read_wandb(path)
    if path.suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_trainer_state(path)
    raise _fail(
        path,
        "unknown run log (expected klbelt .jsonl, trainer_state.json, .csv, or a TensorBoard event file/folder)",
    )


def _ckpt_step(folder: Path) -> int:
    try:
        return int(folder.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1
