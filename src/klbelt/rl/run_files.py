"""The run folder: config.json, metrics.jsonl, samples.jsonl, token_kl.jsonl, extra sinks, report.html.

:class:`RunFiles` opens the folder for a fresh or a resumed run (a resumed
run keeps every log line before its checkpoint and drops the ones after it,
which the run then redoes), builds the KL monitor with the health rules'
state of the steps already run, and writes each update's lines. Only rank 0
writes; the checkpoint itself is :class:`klbelt.rl.run_state.RunState`'s (its file name,
:data:`CHECKPOINT_FILE`, is the folder's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..monitor import KLMonitor
from ..monitor.sinks import make_sink
from ..monitor.token_report import TOKEN_KL_FILE
from .config import TrainConfig
from .distributed import World
from .io import JsonlLog, atomic_write_text, read_jsonl
from .token_log import token_kl_record

CHECKPOINT_FILE = "checkpoint.pt"


def read_steps_before(metrics_path: Path, start: int) -> list[dict]:
    """The metrics records of the steps a resumed run keeps (those before its checkpoint's step)."""
    return [r for r in read_jsonl(metrics_path) if r["step"] < start] if start else []


def replay_monitor(monitor, records: list[dict]) -> None:
    """Give ``monitor``'s health rules the state they had after ``records``, silently (no alerts, no sink lines).

    A resumed run then alerts exactly as the uninterrupted run would have.
    """
    replay = KLMonitor(sinks=(), warn=False)
    for old in records:
        replay.log_metrics(old["step"], {k: v for k, v in old.items() if k != "alerts"})
    monitor.history, monitor.engine = replay.history, replay.engine


class RunFiles:
    """The logs of one run in ``cfg.out`` (written by rank 0 only)."""

    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg, self.world = cfg, world
        self.out = Path(cfg.out)
        self.checkpoint = self.out / CHECKPOINT_FILE
        self.metrics = JsonlLog(self.out / "metrics.jsonl")
        self.samples = JsonlLog(self.out / "samples.jsonl")
        self.tokens = JsonlLog(self.out / TOKEN_KL_FILE)  # per-token KL of a few responses per step, for the report

    def open(self, start: int, *, warn_alerts: bool) -> KLMonitor:
        """Start (``start == 0``) or continue the logs at ``start``; return the run's monitor.

        The monitor's rules see the steps before ``start`` again (replayed
        silently from metrics.jsonl), so a resumed run alerts exactly as an
        uninterrupted one would. ``cfg.report_to`` adds csv / tensorboard /
        wandb / mlflow sinks under the run folder (metrics.jsonl is always written).
        """
        replayed = read_steps_before(self.metrics.path, start)
        logs = (self.metrics, self.samples, self.tokens)
        if self.world.is_main:
            if not start:
                for log in logs:
                    log.path.unlink(missing_ok=True)
            for log in logs:
                log.keep_steps_before(start)
            atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        kinds = [k for k in dict.fromkeys(self.cfg.report_to or ()) if k != "jsonl"] if self.world.is_main else []
        # resumed: csv keeps its rows before start, TensorBoard purges later steps, W&B / MLflow continue their run
        sinks = [make_sink(k, self.out, start=start) for k in kinds]
        monitor = KLMonitor(self.out if sinks else None, sinks=sinks, warn=warn_alerts and self.world.is_main)
        replay_monitor(monitor, replayed)
        return monitor

    def write_step(self, batch, logged, kl: torch.Tensor, tokenizer) -> None:
        """Append the update's metrics (``logged``: :func:`~klbelt.rl.update.step_metrics`'s), every
        ``samples_every`` steps 4 samples, and the per-token KL of rank 0's first rows."""
        if not self.world.is_main:
            return
        cfg, step = self.cfg, batch.step
        self.metrics.append(logged.record)
        if step % cfg.samples_every == 0 or step == cfg.steps - 1:
            self.samples.append({"step": step, "prompts": batch.prompts[:4], "responses": logged.texts[:4],
                                 "rewards": logged.per_sequence[:4, 0].tolist()})
        self.tokens.append(token_kl_record(step, batch.prompts[batch.rows], batch.roll.responses, batch.mask, kl, tokenizer))

    def checkpoint_due(self, step: int) -> bool:
        """Whether the update ``step`` ends with a checkpoint (every ``checkpoint_every`` and the last)."""
        return self.world.is_main and ((step + 1) % self.cfg.checkpoint_every == 0 or step == self.cfg.steps - 1)

    def sync(self) -> None:
        """Flush the logs to disk (before the checkpoint that vouches for them)."""
        for log in (self.metrics, self.samples, self.tokens):
            log.sync()

    def write_report(self) -> Path | None:
        return write_run_report(self.out) if self.world.is_main else None


def write_run_report(out: Path) -> Path | None:
    """The monitor's HTML report of the whole run (all of metrics.jsonl); skipped without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from ..monitor import write_report
    from ..monitor.token_report import find_token_file

    return write_report(read_jsonl(out / "metrics.jsonl"), out / "report.html", title=f"klbelt run: {out}",
                        token_file=find_token_file(out))
