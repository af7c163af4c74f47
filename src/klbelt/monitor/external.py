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

from .names import Run, RunReadError, canonical_name


def _scalars(record):
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
            yield k, float(v)


# -- sinks ------------------------------------------------------------------------------------
class WandbSink:
    """Step records to a W&B run (``wandb.init(dir=log_dir)`` unless ``run`` is given).

    ``resume_step=N`` (a run resumed from its checkpoint at step N): the latest
    W&B run under ``log_dir`` is continued (same run id, ``resume="allow"``),
    not a second run started. Offline, W&B writes the continuation as another
    ``offline-run-*-<id>`` folder; :func:`read_wandb` joins the folders of one
    id and keeps, for the steps from N on, only the values the continuation
    logged. Online, W&B itself ignores steps at or below the run's last logged
    step, so the redone steps up to that step keep the first values there.
    """

    def __init__(self, log_dir=None, run=None, project: str = "klbelt", prefix: str = "klbelt/",
                 resume_step: int | None = None, **init_kwargs):
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("WandbSink needs wandb: pip install wandb") from e
        self._wandb = wandb
        self._owns = run is None
        if run is None:
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                previous = _wandb_run_id(Path(log_dir)) if resume_step else None
                if previous is not None and "id" not in init_kwargs:
                    init_kwargs = {**init_kwargs, "id": previous, "resume": "allow"}
            run = wandb.init(project=project, dir=None if log_dir is None else str(log_dir), **init_kwargs)
        self.run, self.prefix = run, prefix
        self._rows = 0  # history rows logged (close() waits until an offline file holds them)
        self.offline = getattr(run.settings, "mode", "") in ("offline", "dryrun") or os.environ.get("WANDB_MODE") in (
            "offline", "dryrun", "disabled")

    def write(self, record: dict) -> None:
        data = {self.prefix + k: v for k, v in _scalars(record)}
        if record.get("alerts"):
            data[self.prefix + "alerts"] = ";".join(record["alerts"])
        self.run.log(data, step=int(record["step"]))
        self._rows += 1

    def alert(self, alert) -> None:
        if self.offline:  # wandb.alert needs the server; the alert is in the history row
            return
        level = self._wandb.AlertLevel.ERROR if alert.severity == "unhealthy" else self._wandb.AlertLevel.WARN
        self.run.alert(title=f"klbelt: {alert.rule}", text=alert.line(), level=level)

    def close(self) -> None:
        if self._owns:
            run_file = Path(self.run.dir).parent / f"run-{self.run.id}.wandb" if self.offline else None
            self.run.finish()
            if run_file is not None:  # W&B's service can still be writing the offline file after finish()
                _wait_for_rows(run_file, self._rows)


def _wait_for_rows(run_file: Path, rows: int, timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until the offline run file holds ``rows`` history rows, so a reader sees them."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(_wandb_history(run_file, pb)) >= rows:
                return
        except (OSError, RunReadError):
            pass
        time.sleep(0.05)


class MLflowSink:
    """Step records to an MLflow run; ``log_dir`` becomes a local file store ``<log_dir>/mlruns``."""

    def __init__(self, log_dir=None, tracking_uri: str | None = None, experiment: str = "klbelt",
                 prefix: str = "klbelt/", resume_step: int | None = None):
        mlflow = _mlflow()
        if tracking_uri is None and log_dir is not None:
            tracking_uri = (Path(log_dir).resolve() / "mlruns").as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        # resume_step=N: continue the experiment's latest run (same run id); the steps from N on are logged
        # again with later timestamps, and read_mlflow keeps the latest value of each step (MLflow has no
        # call that deletes a logged metric value, so its own history holds both)
        latest = []
        if resume_step:
            latest = self.client.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=1)
        if latest:
            self.run_id = latest[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "klbelt.resumed_at_step", str(int(resume_step)))
        else:
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


def wandb_segments(path: Path) -> list[Path]:
    """The ``.wandb`` files of the latest run's id, oldest first: a resumed offline run is one folder per segment."""
    last = wandb_file(path)
    if last is None or path.is_file() or not list(path.glob("*/run-*.wandb")):
        return [] if last is None else [last]
    same = [p for p in path.glob(f"*/{last.name}") if not p.parent.is_symlink()]  # not wandb's latest-run link
    return sorted(same, key=lambda p: (p.stat().st_mtime, p.parent.name))


def _wandb_run_id(log_dir: Path) -> str | None:
    """The id of the latest W&B run under ``log_dir`` (its ``wandb/`` folder), or None."""
    last = wandb_file(log_dir / "wandb") if (log_dir / "wandb").is_dir() else None
    return None if last is None else last.stem[len("run-"):]


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
    segments = wandb_segments(path)
    if not segments:
        raise _fail(path, "no W&B run here (expected a run-*.wandb file in the folder or one below it)")
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:  # pragma: no cover - depends on the environment
        raise _fail(path, "reading a W&B run needs wandb: pip install wandb") from None
    records: list[dict] = []
    for f in segments:  # a continuation replaces the steps from its first one on (redone after a resume)
        more = _wandb_history(f, pb)
        if more:
            records = [r for r in records if r["step"] < more[0]["step"]] + more
    f = segments[-1]
    if not any(len(r) > 1 for r in records):
        raise _fail(f, "W&B run without history rows (nothing was logged with wandb.log)")
    return Run(f, "wandb", records)


def _wandb_history(f: Path, pb) -> list[dict]:
    data = f.read_bytes()
    if not data.startswith(b":W&B"):
        raise _fail(f, "not a W&B run file (no :W&B header)")
    records: list[dict] = []
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
        if records and step <= records[-1]["step"]:  # the run went back (resumed in one file): later values win
            records = [r for r in records if r["step"] < step]
        records.append({"step": step, **{canonical_name(k): v for k, v in row.items() if not k.startswith("_")}})
    return records


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
            # oldest first (stable for equal times): a value logged again for a step after a resume wins
            for m in sorted(client.get_metric_history(run_dir.name, key), key=lambda m: m.timestamp):
                if math.isfinite(m.value):
                    by_step.setdefault(int(m.step), {})[canonical_name(key)] = float(m.value)
    except mlflow.exceptions.MlflowException as e:
        raise _fail(run_dir, f"MLflow cannot read this run ({str(e).splitlines()[0]})") from None
    if not by_step:
        raise _fail(run_dir, "MLflow run without metrics")
    return Run(run_dir, "mlflow", [{"step": s, **by_step[s]} for s in sorted(by_step)])
