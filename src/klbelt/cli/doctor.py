"""``klbelt doctor PATH``: the health verdicts of a run as a table.

Exit code (a CI gate): 0 healthy, 1 warnings, 2 unhealthy, 3 the run cannot be
read, 4 nothing could be checked (every rule n/a: no metric a rule reads, too few
steps, or only old-vs-new-policy KL); 64 a command-line usage error.
``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

from .report import add_run_arguments, load

UNREADABLE = 3
NOTHING_CHECKED = 4
USAGE = USAGE_EXIT_CODE = 64  # BSD's EX_USAGE: no verdict uses it (klbelt.cli.main reads USAGE_EXIT_CODE)
VERDICT_WORDS = {0: "healthy", 1: "warnings", 2: "unhealthy", 3: "unreadable", 4: "nothing checked"}
#: KL between the old (rollout) and the new policy inside a PPO update: a step size, not the belt's KL
OLD_POLICY_KL = "kl_old_policy"
_REFERENCE_KL = ("kl", "kl_seq", "kl_exact")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="health verdicts of a run; exit 0 healthy, 1 warnings, 2 unhealthy, 3 unreadable, 4 nothing checked",
        description="Show the health verdicts of a run as a table (--json: one JSON object). The exit code is "
        "meant for CI gates: 0 healthy, 1 warnings, 2 unhealthy, 3 the run cannot be read, 4 nothing could be "
        "checked (no metric a rule reads, or too few steps), 64 a command-line usage error.",
    )

    def usage_error(message):  # argparse exits 2 ("unhealthy" here): use a code no verdict uses
        p.print_usage(sys.stderr)
        p.exit(USAGE, f"{p.prog}: error: {message}\n")

    p.error = usage_error
    add_run_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (verdict, exit code, rules, alerts)")
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


def _only_old_policy_kl(records) -> bool:
    keys = set().union(*(r.keys() for r in records)) if records else set()
    return OLD_POLICY_KL in keys and not keys.intersection(_REFERENCE_KL)


def run(args) -> int:
    from ..monitor.rules import diagnose, doctor_rules, exit_code
    from .report import column_mapping

    try:
        column_mapping(args.column)
    except ValueError as e:
        print(f"klbelt doctor: error: {e}", file=sys.stderr)
        return USAGE
    run_ = load(args)
    if run_ is None:
        if args.json:
            print(json.dumps({"path": args.path, "verdict": VERDICT_WORDS[UNREADABLE], "exit_code": UNREADABLE}))
        return UNREADABLE
    verdicts, alerts = diagnose(run_.records, doctor_rules())
    code = exit_code(verdicts)
    steps = run_.records
    messages = []
    if _only_old_policy_kl(steps):
        messages.append("every KL column in this log is KL between the old and the new policy inside a PPO update "
                        "(e.g. actor/ppo_kl, approx_kl, policy/approxkl_avg), not KL to the reference: "
                        "the KL rules cannot check it")
        code = NOTHING_CHECKED if code == 0 else code
    if code == NOTHING_CHECKED:
        messages.append("nothing could be checked: every rule is n/a")
    if args.json:
        print(json.dumps({
            "path": str(run_.path), "format": run_.format, "steps": len(steps),
            "first_step": steps[0]["step"], "last_step": steps[-1]["step"],
            "verdict": VERDICT_WORDS[code], "exit_code": code,
            "rules": [{"rule": v.rule, "status": v.status, "severity": v.severity, "message": v.message,
                       "thresholds": v.thresholds, "alert_steps": list(v.fired_at)} for v in verdicts],
            "alert_steps": sorted({a.step for a in alerts}),
            "alerts": [{"rule": a.rule, "severity": a.severity, "step": a.step, "message": a.message} for a in alerts],
            "messages": messages,
        }))
        return code
    print(f"{run_.path} ({run_.format}): {len(steps)} steps, {steps[0]['step']}-{steps[-1]['step']}")
    print(format_table(verdicts, shutil.get_terminal_size((100, 20)).columns))
    for m in messages:
        print(m)
    print(f"verdict: {VERDICT_WORDS[code]} (exit code {code})")
    return code
