"""Weights & Biases and MLflow: sinks that send klbelt's step records there, readers that read runs back.

* :class:`WandbSink`: ``wandb.log`` per step; alerts through ``wandb.alert``
  when the run is online (offline runs, ``WANDB_MODE=offline``, keep them in
  the history as ``klbelt/alerts`` text). Needs ``wandb``.
* :class:`MLflowSink`: ``mlflow.log_metrics`` per step into a run; alerts as
  the run's ``klbelt.alerts`` tag. Needs ``mlflow`` (or
  ``mlflow-skinny``). A local folder is used as a file store
  (``file://<log_dir>/mlruns``).
* :func:`read_wandb`: a W&B run folder (``offline-run-*`` / ``run-*`` with a
  ``run-*.wandb`` file), a ``wandb/`` folder (its latest run) or the ``.wandb``
  file: the history rows, ``_step`` as the step. The file is a LevelDB-style
  log of ``wandb.proto`` ``Record`` messages, decoded with wandb's own protobuf classes.
* :func:`read_mlflow`: an MLflow file store (``mlruns``: its latest run), an
  experiment folder or a run folder, through ``mlflow.MlflowClient``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .readers import Run, RunReadError, canonical_name


def _scalars(record):
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
            yield k, float(v)


# -- sinks ------------------------------------------------------------------------------------
class WandbSink:
    """Step records to a W&B run (``wandb.init(dir=log_dir)`` unless ``run`` is given)."""

    def __init__(self, log_dir=None, run=None, project: str = "klbelt", prefix: str = "klbelt/", **init_kwargs):
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("WandbSink needs wandb: pip install wandb") from e
        self._wandb = wandb
        self._owns = run is None
        if run is None:
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, dir=None if log_dir is None else str(log_dir), **init_kwargs)
        self.run, self.prefix = run, prefix
        self.offline = getattr(run.settings, "mode", "") in ("offline", "dryrun") or os.environ.get("WANDB_MODE") in (
            "offline", "dryrun", "disabled")

    def write(self, record: dict) -> None:
        data = {self.prefix + k: v for k, v in _scalars(record)}
        if record.get("alerts"):
            data[self.prefix + "alerts"] = ";".join(record["alerts"])
        self.run.log(data, step=int(record["step"]))

    def alert(self, alert) -> None:
        if self.offline:  # wandb.alert needs the server; the alert is in the history row
            return
        level = self._wandb.AlertLevel.ERROR if alert.severity == "unhealthy" else self._wandb.AlertLevel.WARN
        self.run.alert(title=f"klbelt: {alert.rule}", text=alert.line(), level=level)

    def close(self) -> None:
        if self._owns:
            self.run.finish()


class MLflowSink:
    """Step records to an MLflow run; ``log_dir`` becomes a local file store ``<log_dir>/mlruns``."""

    def __init__(self, log_dir=None, tracking_uri: str | None = None, experiment: str = "klbelt", prefix: str = "klbelt/"):
        mlflow = _mlflow()
        if tracking_uri is None and log_dir is not None:
            tracking_uri = (Path(log_dir).resolve() / "mlruns").as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id).info.run_id
        self.prefix = prefix
        self._alerts: list[str] = []

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        metrics = [Metric(self.prefix + k, v, now, int(record["step"])) for k, v in _scalars(record)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def alert(self, alert) -> None:
        self._alerts.append(alert.line())
        self.client.set_tag(self.run_id, "klbelt.alerts", "\n".join(self._alerts)[-5000:])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow():
    # MLflow >= 3.7 refuses a local file store unless asked; a local folder is what a sink given log_dir means
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MLflow support needs mlflow: pip install mlflow-skinny") from e
    return mlflow


# -- readers ----------------------------------------------------------------------------------
def _fail(path, problem) -> RunReadError:
    return RunReadError(f"{path}: {problem}")


def wandb_file(path: Path) -> Path | None:
    """The ``.wandb`` file of a W&B run folder / ``wandb`` folder (its latest run), or None."""
    if path.is_file():
        return path if path.suffix == ".wandb" else None
    files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _leveldb_records(data: bytes):
    """The payloads of a LevelDB-format log (7-byte W&B header, 32 KiB blocks, 7-byte record headers)."""
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
        elif kind == 4:  # LAST
            yield buf + chunk
            buf = b""


def read_wandb(path) -> Run:
    """A W&B run's history (offline or synced run folder), ``_step`` as the step."""
    path = Path(path)
    f = wandb_file(path)
    if f is None:
        raise _fail(path, "no W&B run here (expected a run-*.wandb file in the folder or one below it)")
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:  # pragma: no cover - depends on the environment
        raise _fail(path, "reading a W&B run needs wandb: pip install wandb") from None
    data = f.read_bytes()
    if not data.startswith(b":W&B"):
        raise _fail(f, "not a W&B run file (no :W&B header)")
    records = []
    for payload in _leveldb_records(data):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # a record cut by a crash: keep what came before it
            break
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                value = json.loads(item.value_json)
            except ValueError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[key] = value
        if "_step" not in row:
            continue
        step = int(row.pop("_step"))
        records.append({"step": step, **{canonical_name(k): v for k, v in row.items() if not k.startswith("_")}})
    if not any(len(r) > 1 for r in records):
        raise _fail(f, "W&B run without history rows (nothing was logged with wandb.log)")
    return Run(f, "wandb", records)


def mlflow_run_dir(path: Path) -> Path | None:
    """The run folder of an MLflow file store / experiment / run folder (the latest run), or None."""
    if not path.is_dir():
        return None
    if (path / "meta.yaml").is_file() and (path / "metrics").is_dir():
        return path
    runs = [p.parent for p in path.glob("*/meta.yaml") if (p.parent / "metrics").is_dir()]
    runs += [p.parent for p in path.glob("*/*/meta.yaml") if (p.parent / "metrics").is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def read_mlflow(path) -> Run:
    """An MLflow run from a local file store, through ``mlflow.MlflowClient``: one record per logged step."""
    path = Path(path)
    run_dir = mlflow_run_dir(path)
    if run_dir is None:
        raise _fail(path, "no MLflow run here (expected mlruns/<experiment>/<run>/meta.yaml with metrics/)")
    mlflow = _mlflow()
    client = mlflow.MlflowClient(tracking_uri=run_dir.parent.parent.resolve().as_uri())
    try:
        keys = list(client.get_run(run_dir.name).data.metrics)
        by_step: dict[int, dict] = {}
        for key in keys:
            for m in client.get_metric_history(run_dir.name, key):
                if math.isfinite(m.value):
                    by_step.setdefault(int(m.step), {})[canonical_name(key)] = float(m.value)
    except mlflow.exceptions.MlflowException as e:
        raise _fail(run_dir, f"MLflow cannot read this run ({str(e).splitlines()[0]})") from None
    if not by_step:
        raise _fail(run_dir, "MLflow run without metrics")
    return Run(run_dir, "mlflow", [{"step": s, **by_step[s]} for s in sorted(by_step)])
