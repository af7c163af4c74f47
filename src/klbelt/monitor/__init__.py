"""Layer 4: monitoring. Per-step KL metrics, health rules and alerts, sinks, readers, the HTML report.

Imports only layers 1-2 (``klbelt.kl``, ``klbelt.shaping``); matplotlib and
tensorboard are imported only by the functions that need them.
"""

from .metrics import KL_HIST_EDGES, METRICS, token_stats
from .monitor import KLHealthWarning, KLMonitor
from .readers import ALIASES, Run, RunReadError, read_csv, read_jsonl, read_run, read_tensorboard, read_trainer_state
from .rules import (
    Alert,
    Finding,
    KLBand,
    KLRunaway,
    MaxKLSpike,
    ModeCollapse,
    NegativeKL,
    RolloutMismatch,
    StepZeroKL,
    RewardHacking,
    Rule,
    RuleEngine,
    Verdict,
    default_rules,
    doctor_rules,
    diagnose,
    exit_code,
)
from .sinks import CSVSink, JSONLSink, TensorBoardSink


def write_report(history, out, **kwargs):
    """Write the self-contained HTML report (see :func:`klbelt.monitor.report.write_report`); needs matplotlib."""
    from .report import write_report as _write

    return _write(history, out, **kwargs)


__all__ = [
    "KLMonitor",
    "KLHealthWarning",
    "METRICS",
    "KL_HIST_EDGES",
    "token_stats",
    "Rule",
    "Finding",
    "Alert",
    "Verdict",
    "KLBand",
    "MaxKLSpike",
    "KLRunaway",
    "RewardHacking",
    "ModeCollapse",
    "NegativeKL",
    "RolloutMismatch",
    "StepZeroKL",
    "RuleEngine",
    "default_rules",
    "doctor_rules",
    "diagnose",
    "exit_code",
    "JSONLSink",
    "CSVSink",
    "TensorBoardSink",
    "Run",
    "RunReadError",
    "ALIASES",
    "read_run",
    "read_jsonl",
    "read_trainer_state",
    "read_tensorboard",
    "read_csv",
    "write_report",
]
