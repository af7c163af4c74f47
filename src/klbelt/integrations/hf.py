"""A ``transformers.TrainerCallback`` that watches a (TRL) trainer's KL with a :class:`KLMonitor`.

Every ``on_log`` entry (TRL's ``kl``, ``reward``, ``entropy``, ``objective/kl``,
``objective/scores``, ...) is renamed to klbelt's metric names (see
:data:`klbelt.monitor.ALIASES`; TRL's ``objective/kl`` is per sequence, so it
becomes ``kl_seq``) and fed to the monitor, which raises alerts while the
trainer runs; at the end of training the HTML report is written.

Example::

    from klbelt.integrations import KLMonitorCallback
    trainer = GRPOTrainer(..., callbacks=[KLMonitorCallback()])
    trainer.train()   # alerts as warnings; <output_dir>/klbelt/report.html at the end
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from ..monitor.monitor import KLMonitor
from ..monitor.readers import normalize_logs

logger = logging.getLogger("klbelt.monitor")


class KLMonitorCallback(TrainerCallback):
    """Feed a trainer's logged metrics into a :class:`KLMonitor`.

    Args:
        monitor: the monitor to feed; default a new one writing ``metrics.jsonl``
            to ``log_dir``.
        log_dir: where the default monitor's JSONL and the report go; default
            ``<args.output_dir>/klbelt``.
        report: write ``report.html`` into ``log_dir`` when training ends.
        **monitor_kwargs: passed to the default :class:`KLMonitor` (``rules``, ``on_alert``, ``warn``).
    """

    def __init__(self, monitor: KLMonitor | None = None, log_dir=None, report: bool = True, **monitor_kwargs):
        if monitor is not None and not isinstance(monitor, KLMonitor):
            raise TypeError(f"monitor must be a KLMonitor, got {type(monitor).__name__}")
        self.monitor = monitor
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.report = bool(report)
        self._monitor_kwargs = monitor_kwargs
        self.report_path: Path | None = None

    def _ensure(self, args):
        if self.log_dir is None:
            self.log_dir = Path(args.output_dir) / "klbelt"
        if self.monitor is None:
            self.monitor = KLMonitor(self.log_dir, **self._monitor_kwargs)
        return self.monitor

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step > 0 and self.monitor is None:
            self._resume(args, state.global_step)
        self._ensure(args)

    def _resume(self, args, step: int) -> None:
        """Resumed from ``checkpoint-<step>``: keep the log's records up to ``step``, append after them.

        Records written after the checkpoint (by the run that was interrupted) are dropped,
        never the whole file; the kept records are replayed into the rules without re-alerting.
        """
        from ..monitor.sinks import JSONLSink
        from ..rl.io import JsonlLog, read_jsonl

        if self.log_dir is None:
            self.log_dir = Path(args.output_dir) / "klbelt"
        path = self.log_dir / "metrics.jsonl"
        if "sinks" in self._monitor_kwargs or not path.exists():
            return
        JsonlLog(path).keep_steps_before(step + 1)
        kept = read_jsonl(path)
        self.monitor = KLMonitor(None, sinks=[JSONLSink(path, append=True)], **self._monitor_kwargs)
        for record in kept:
            self.monitor.history.append(record)
            self.monitor.engine.observe(self.monitor.history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = normalize_logs(logs, state.global_step)
        if record is None:
            return
        step = record.pop("step")
        self._ensure(args).log_metrics(int(step), record)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.monitor is None:
            return
        if self.report and self.monitor.history:
            try:
                self.report_path = self.monitor.write_report(self.log_dir / "report.html", title="klbelt: TRL run")
                logger.info("klbelt report written to %s", self.report_path)
            except ImportError as e:  # matplotlib missing: keep the JSONL, say why there is no report
                logger.warning("klbelt: no report (%s); pip install 'klbelt[plot]'", e)
        self.monitor.close()
