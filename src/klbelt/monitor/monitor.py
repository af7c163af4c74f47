"""KLMonitor: per-step KL metrics, health rules, alerts, sinks and the report, in one object."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..kl import _checks
from . import metrics as _metrics
from .rules import Alert, Rule, RuleEngine, exit_code
from .sinks import make_sink

logger = logging.getLogger("klbelt.monitor")


class KLHealthWarning(UserWarning):
    """Warning category of klbelt's health alerts (filter it with the ``warnings`` module)."""


class KLMonitor:
    """Turns per-step tensors into metrics, keeps the history, checks health rules, raises alerts.

    Call :meth:`log_step` once per optimisation step (or :meth:`log_metrics` with
    numbers already reduced, as the TRL callback does). Metric names and units
    are in :data:`klbelt.monitor.METRICS`: ``kl``, ``kl_max``, ``kl_p50/p90/p99``
    are nats/token, ``kl_seq``, ``kl_seq_max`` nats/sequence.

    Args:
        log_dir: folder for the sinks named in ``sinks`` (``None``: keep in memory only).
        sinks: names (``"jsonl"``, ``"csv"``, ``"tensorboard"``) or sink objects;
            default ``("jsonl",)`` when ``log_dir`` is given, else none.
        rules: health rules (default :func:`klbelt.monitor.default_rules`); ``[]`` for none.
        on_alert: called with each new :class:`Alert`.
        warn: also issue each alert as a :class:`KLHealthWarning`.
        exact_chunk_size: rows per block for the exact KL (``kl_from_logits``'s ``chunk_size``).

    Example::

        monitor = KLMonitor("runs/a")
        for step in range(n):
            ...
            monitor.log_step(step, kl=kl, mask=mask, kl_coef=beta, reward=scores)
        monitor.write_report("runs/a/report.html")
    """

    def __init__(
        self,
        log_dir=None,
        *,
        sinks: Iterable | None = None,
        rules: Iterable[Rule] | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        warn: bool = True,
        exact_chunk_size: int | None = None,
    ):
        self.log_dir = None if log_dir is None else Path(log_dir)
        if sinks is None:
            sinks = ("jsonl",) if log_dir is not None else ()
        self.sinks = [make_sink(s, self.log_dir) for s in sinks]
        self.engine = RuleEngine(rules)
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable, got {type(on_alert).__name__}")
        self.on_alert = on_alert
        self.warn = bool(warn)
        self.exact_chunk_size = _checks.chunk_rows("exact_chunk_size", exact_chunk_size)
        self.history: list[dict] = []

    # -- feeding -------------------------------------------------------------------------
    def log_step(
        self,
        step: int,
        kl: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        kl_coef=None,
        reward=None,
        gold_reward=None,
        entropy=None,
        logits: torch.Tensor | None = None,
        ref_logits: torch.Tensor | None = None,
        kl_exact: torch.Tensor | None = None,
        **scalars,
    ) -> dict:
        """Compute and record one step's metrics; return the record (a dict of Python numbers).

        Args:
            step: the optimisation step.
            kl: ``[B, T]`` per-token KL estimate (nats/token), e.g. from ``kl_per_token``.
            mask: ``[B, T]`` valid-token mask (bool or 0/1); default all valid.
            kl_coef: beta (number or 0-d tensor).
            reward, gold_reward: per-sequence scores ``[B]`` or their mean.
            entropy: per-token entropy ``[B, T]`` (nats/token, masked mean) or its mean.
            logits, ref_logits: ``[B, T, V]`` policy and reference logits; when given,
                the exact KL ``kl_exact`` and the estimator's gap ``kl_est_gap = kl - kl_exact``
                are logged (without ``kl``, the exact values are the per-token KL).
            kl_exact: ``[B, T]`` exact per-token KL the caller already computed (e.g. for
                its loss), used instead of recomputing it from ``logits``: no extra cost.
            **scalars: further metrics (numbers or 0-d tensors), e.g. ``distinct_2=0.8``.

        All tensor statistics are computed on the tensors' device and moved to
        the host in one transfer.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        values: dict = {}
        if (logits is None) != (ref_logits is None):
            raise ValueError("logits and ref_logits must be given together (the exact KL needs both)")
        exact = None
        if logits is not None and kl_exact is not None:
            raise ValueError("give either logits/ref_logits or kl_exact, not both (both are the exact KL)")
        if logits is not None:
            ex, exact = _metrics.exact_stats(logits, ref_logits, mask, self.exact_chunk_size)
            values.update(ex)
        elif kl_exact is not None:
            exact = kl_exact
            ex = _metrics.token_stats(kl_exact, mask)
            values.update(kl_exact=ex["kl"], kl_exact_max=ex["kl_max"])
        if kl is None and exact is not None:
            kl = exact
        if kl is not None:
            values.update(_metrics.token_stats(kl, mask))
            if exact is not None and kl is not exact:
                values["kl_est_gap"] = values["kl"] - values["kl_exact"]
        elif mask is not None:
            raise ValueError("mask was given without kl or logits (it masks the per-token KL)")
        for name, value in (("kl_coef", kl_coef), ("reward", reward), ("gold_reward", gold_reward)):
            if value is not None:
                values[name] = _metrics.batch_mean(name, value)
        if entropy is not None:
            values["entropy"] = _metrics.batch_mean("entropy", entropy, mask)
        for name, value in scalars.items():
            values[name] = _metrics.batch_mean(name, value) if isinstance(value, torch.Tensor) else value
        order = {name: i for i, name in enumerate(_metrics.METRICS)}
        values = {k: values[k] for k in sorted(values, key=lambda k: order.get(k, len(order)))}
        return self.log_metrics(step, _metrics.to_host(values))

    def log_metrics(self, step: int, metrics: Mapping) -> dict:
        """Record metrics that are already numbers (e.g. from another trainer's logs); check the rules."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
        record = {"step": step}
        for k, v in metrics.items():
            if k == "step":
                continue
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if not isinstance(v, (int, float, list, str, type(None))) or isinstance(v, bool):
                raise TypeError(f"metrics[{k!r}] must be a number, got {type(v).__name__}")
            record[k] = v
        self.history.append(record)
        alerts = self.engine.observe(self.history)
        if alerts:
            record["alerts"] = [a.rule for a in alerts]
        for sink in self.sinks:
            sink.write(record)
        for alert in alerts:
            self._raise(alert)
        return record

    def _raise(self, alert: Alert) -> None:
        log = logger.error if alert.severity == "unhealthy" else logger.warning
        log(alert.line())
        for sink in self.sinks:
            sink.alert(alert)
        if self.warn:
            warnings.warn(alert.line(), KLHealthWarning, stacklevel=4)
        if self.on_alert is not None:
            self.on_alert(alert)

    # -- reading -------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far, in order."""
        return list(self.engine.alerts)

    def verdicts(self):
        """One :class:`Verdict` per rule for the run so far."""
        return self.engine.verdicts(self.history)

    def exit_code(self) -> int:
        """0 healthy, 1 warnings, 2 unhealthy, 4 nothing could be checked (every rule n/a)."""
        return exit_code(self.verdicts())

    def write_report(self, path, title: str = "klbelt run") -> Path:
        """Write the self-contained HTML report of the run so far (needs matplotlib)."""
        from .report import write_report

        return write_report(self.history, path, title=title, verdicts=self.verdicts(), alerts=self.alerts)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
