"""``klbelt doctor PATH``: the health verdicts of a run as a table.

Exit code: 0 healthy, 1 warnings, 2 unhealthy (so it can gate a pipeline);
3 when the run cannot be read.
"""

from __future__ import annotations

import shutil
import textwrap

from .report import add_run_arguments, load

UNREADABLE = 3


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="health verdicts of a run; exit 0 healthy, 1 warnings, 2 unhealthy, 3 unreadable",
        description=__doc__,
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def format_table(verdicts, width: int = 100) -> str:
    """A plain-text table: rule, status, alert steps, message (wrapped)."""
    steps = [", ".join(map(str, v.fired_at[:8])) + (" ..." if len(v.fired_at) > 8 else "") or "-" for v in verdicts]
    w_rule = max(len("RULE"), *(len(v.rule) for v in verdicts))
    w_status = max(len("STATUS"), *(len(v.status) for v in verdicts))
    w_steps = max(len("ALERT AT STEP"), *(len(s) for s in steps))
    w_msg = max(30, width - w_rule - w_status - w_steps - 6)
    lines = [f"{'RULE':<{w_rule}}  {'STATUS':<{w_status}}  {'ALERT AT STEP':<{w_steps}}  MESSAGE"]
    lines.append("-" * min(width, w_rule + w_status + w_steps + 6 + w_msg))
    for v, s in zip(verdicts, steps):
        msg = textwrap.wrap(v.message, w_msg) or [""]
        lines.append(f"{v.rule:<{w_rule}}  {v.status:<{w_status}}  {s:<{w_steps}}  {msg[0]}")
        lines += [" " * (w_rule + w_status + w_steps + 6) + m for m in msg[1:]]
    return "\n".join(lines)


def run(args) -> int:
    from ..monitor.rules import diagnose, exit_code

    run_ = load(args)
    if run_ is None:
        return UNREADABLE
    verdicts, _ = diagnose(run_.records)
    code = exit_code(verdicts)
    steps = run_.records
    print(f"{run_.path} ({run_.format}): {len(steps)} steps, {steps[0]['step']}-{steps[-1]['step']}")
    print(format_table(verdicts, shutil.get_terminal_size((100, 20)).columns))
    print(f"verdict: {['healthy', 'warnings', 'unhealthy'][code]} (exit code {code})")
    return code
