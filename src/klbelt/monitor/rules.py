"""Health rules: small objects that look at a run's history and say what is wrong.

Each rule has a ``name``, configurable thresholds (units in :meth:`Rule.thresholds`),
a ``severity`` (``"warning"`` or ``"unhealthy"``) and, when its condition holds
at the latest step, returns a :class:`Finding` whose message tells a person what
to do. :class:`RuleEngine` turns findings into :class:`Alert` s (once when a
condition starts to hold, again only after it cleared) and verdicts.

The rules are the article's "What to Watch During Training": mean KL in
0.01-0.1 nats/token, max-KL spikes, KL that keeps climbing instead of
plateauing, reward rising while the gold reward falls, plus two bug/collapse
checks (entropy or distinct-n collapsing; an estimate that stays negative).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

SEVERITIES = ("warning", "unhealthy")


@dataclass
class Finding:
    """A rule's condition holding at one step. ``key`` distinguishes kinds (e.g. "low"/"high")."""

    message: str
    value: float
    key: str = ""
    severity: str | None = None  # overrides the rule's severity (a rule with a warning and an unhealthy level)


@dataclass
class Alert:
    """An alert raised when a rule's condition starts to hold."""

    rule: str
    severity: str
    step: int
    message: str
    value: float

    def line(self) -> str:
        return f"[klbelt {self.severity}] step {self.step}: {self.rule}: {self.message}"


@dataclass
class Verdict:
    """A rule's verdict over a whole run. ``status``: ``ok``, ``warning``, ``unhealthy`` or ``n/a``."""

    rule: str
    severity: str
    status: str
    message: str
    thresholds: str
    fired_at: list[int] = field(default_factory=list)


def _values(history, metric, n=None):
    """The last ``n`` (all if None) non-missing values of ``metric``, oldest first."""
    out = []
    for rec in reversed(history):
        v = rec.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
            if n is not None and len(out) == n:
                break
    out.reverse()
    return out


def _first_present(history, metrics, recent=64):
    """The first of ``metrics`` logged in the last ``recent`` records (all records if None)."""
    rows = history if recent is None else history[-recent:]
    for m in metrics:
        if any(isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool) for r in rows):
            return m
    return None


class _Prefix(Sequence):
    """The first ``n`` records of a list, without copying (replaying a run step by step)."""

    def __init__(self, records, n):
        self._records, self._n = records, n

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            return self._records[start:stop:step]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._records[i]


def _check_severity(severity):
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return severity


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return value


class Rule:
    """Base class. Subclasses set ``name``, ``metrics`` (alternatives, first present is used) and ``check``."""

    name = "rule"
    metrics: tuple[str, ...] = ()

    def __init__(self, severity: str):
        self.severity = _check_severity(severity)

    def metric(self, history, recent=64) -> str | None:
        """The metric this rule reads in ``history`` (its last ``recent`` records), or None if not logged."""
        return _first_present(history, self.metrics, recent)

    def missing(self) -> str:
        return f"not checked: the run logs none of {', '.join(self.metrics)}"

    def min_steps(self) -> int:
        """Records of its metric the rule needs before it can fire (fewer: its verdict is n/a, not ok)."""
        return 1

    def thresholds(self) -> str:  # pragma: no cover - overridden
        return ""

    def check(self, history) -> Finding | None:  # pragma: no cover - overridden
        raise NotImplementedError


class KLBand(Rule):
    """Mean per-token KL outside the article's healthy band ``[low, high]`` (nats/token).

    Below ``low`` for ``patience`` steps after ``warmup`` steps (KL starts near
    zero by design): barely moving. Above ``high`` for ``patience`` steps: drifting.
    """

    name = "kl_band"
    metrics = ("kl",)

    def __init__(self, low=0.01, high=0.1, patience=5, warmup=10, severity="warning"):
        super().__init__(severity)
        self.low, self.high = _positive("low", low), _positive("high", high)
        if low >= high:
            raise ValueError(f"low must be < high, got low={low}, high={high}")
        self.patience, self.warmup = int(_positive("patience", patience)), int(warmup)

    def thresholds(self):
        return f"{self.low} <= kl <= {self.high} nats/token, {self.patience} steps in a row (low: after {self.warmup})"

    def min_steps(self):
        return self.patience

    def missing(self):
        return "not checked: no per-token mean KL (kl) in the log; the band is in nats/token, not nats/sequence"

    def check(self, history):
        vals = _values(history, "kl", self.patience)
        if len(vals) < self.patience:
            return None
        last = vals[-1]
        if all(v > self.high for v in vals):
            return Finding(
                f"drifting: mean KL {last:.3g} nats/token has been above {self.high} for {self.patience} steps; "
                "reward-hacking risk: raise kl_coef (beta) or use an adaptive controller with a lower target",
                last,
                "high",
            )
        if len(_values(history, "kl")) > self.warmup and all(v < self.low for v in vals):
            return Finding(
                f"barely moving: mean KL {last:.3g} nats/token has been below {self.low} for {self.patience} steps; "
                "beta (kl_coef) may be too high or the learning rate too low",
                last,
                "low",
            )
        return None


class MaxKLSpike(Rule):
    """Largest per-token KL jumps above ``factor`` x its median over the previous ``window`` steps."""

    name = "max_kl_spike"
    metrics = ("kl_max", "kl_exact_max", "kl_seq_max")

    def __init__(self, factor=5.0, window=20, min_history=5, floor=1.0, severity="warning"):
        super().__init__(severity)
        self.factor, self.window = _positive("factor", factor), int(_positive("window", window))
        self.min_history, self.floor = int(_positive("min_history", min_history)), float(floor)

    def thresholds(self):
        return (
            f"kl_max > {self.factor} x median of previous {self.window} steps and > {self.floor} nats/token "
            f"(after {self.min_history} steps)"
        )

    def min_steps(self):
        return self.min_history + 1

    def check(self, history):
        metric = self.metric(history)
        if metric is None:
            return None
        vals = _values(history, metric, self.window + 1)
        if len(vals) < self.min_history + 1 or history[-1].get(metric) is None:
            return None
        current, base = vals[-1], statistics.median(vals[:-1])
        if current > self.floor and current > self.factor * max(base, 1e-12):
            unit = "nats/sequence" if "seq" in metric else "nats/token"
            return Finding(
                f"{metric} spiked to {current:.3g} {unit} ({current / max(base, 1e-12):.1f}x the median of the last "
                f"{len(vals) - 1} steps): instability, or the policy found an exploit of the reward; "
                "read this step's highest-KL samples",
                current,
            )
        return None


class KLRunaway(Rule):
    """KL that keeps climbing: three consecutive ``segment``-step means each ``growth`` above the last,
    with no deceleration (latest increase >= ``min_ratio`` x the one before), for ``patience`` steps.

    A healthy run rises then plateaus, so its increases shrink; a runaway one does not.
    """

    name = "kl_runaway"
    metrics = ("kl", "kl_exact", "kl_seq")

    def __init__(self, segment=20, growth=0.05, min_ratio=0.9, patience=10, severity="unhealthy"):
        super().__init__(severity)
        self.segment = int(_positive("segment", segment))
        self.growth, self.min_ratio = float(growth), float(min_ratio)
        self.patience = int(_positive("patience", patience))
        self._streak = 0
        self._seen = 0

    def thresholds(self):
        return (
            f"3 x {self.segment}-step means of KL each > {1 + self.growth:g}x the previous, latest rise >= "
            f"{self.min_ratio} x the previous rise, {self.patience} steps in a row (unit of the metric used)"
        )

    def min_steps(self):
        return 3 * self.segment

    def _holds(self, vals):
        s = self.segment
        a, b, c = (sum(vals[i * s : (i + 1) * s]) / s for i in range(3))
        rising = b > a * (1 + self.growth) and c > b * (1 + self.growth) and b > 0
        return rising and (c - b) >= self.min_ratio * (b - a), (a, b, c)

    def check(self, history):
        metric = self.metric(history)
        if metric is None:
            return None
        vals = _values(history, metric, 3 * self.segment)
        if len(vals) < 3 * self.segment:
            self._streak = 0
            return None
        # the engine calls once per step; a fresh replay over a prefix restarts the streak
        if len(history) != self._seen + 1:
            self._streak = 0
        self._seen = len(history)
        holds, (a, b, c) = self._holds(vals)
        self._streak = self._streak + 1 if holds else 0
        if self._streak >= self.patience:
            unit = "nats/sequence" if "seq" in metric else "nats/token"
            return Finding(
                f"{metric} keeps climbing without a plateau ({a:.3g} -> {b:.3g} -> {c:.3g} {unit} over the last "
                f"3 x {self.segment} steps): the KL penalty is not holding the policy; raise kl_coef, "
                "use an adaptive controller, or stop and keep an earlier checkpoint",
                c,
            )
        return None


class RewardHacking(Rule):
    """Proxy reward rising while the gold reward (or fluency) falls over the last ``window`` steps.

    Compares the means of the window's two halves in units of their noise
    (a two-sample z score with the within-half standard deviation).
    """

    name = "reward_hacking"
    metrics = ("gold_reward", "fluency")

    def __init__(self, window=20, z=2.0, severity="unhealthy"):
        super().__init__(severity)
        self.window, self.z = int(_positive("window", window)), float(_positive("z", z))
        if self.window < 4:
            raise ValueError(f"window must be >= 4 steps, got {window}")

    def thresholds(self):
        return f"over {self.window} steps: reward z > +{self.z} and gold reward z < -{self.z} (half vs half)"

    def min_steps(self):
        return self.window

    def missing(self):
        return "not checked: no gold_reward (or fluency) in the log, so proxy-vs-true reward cannot be compared"

    def metric(self, history, recent=64):
        gold = _first_present(history, self.metrics, recent)
        return gold if gold is not None and _first_present(history, ("reward",), recent) else None

    def _z(self, vals):
        h = len(vals) // 2
        first, second = vals[:h], vals[-h:]
        sd = math.sqrt((statistics.pvariance(first) + statistics.pvariance(second)) / 2)
        diff = statistics.fmean(second) - statistics.fmean(first)
        return diff / max(sd * math.sqrt(2 / h), 1e-12 + 1e-6 * abs(diff)), diff

    def check(self, history):
        gold = self.metric(history)
        if gold is None:
            return None
        rows = [r for r in history[-self.window :] if _values([r], "reward") and _values([r], gold)]
        if len(rows) < self.window:
            return None
        z_r, d_r = self._z([float(r["reward"]) for r in rows])
        z_g, d_g = self._z([float(r[gold]) for r in rows])
        if z_r > self.z and z_g < -self.z:
            return Finding(
                f"proxy reward rose by {d_r:+.3g} while {gold} fell by {d_g:+.3g} over the last {self.window} steps: "
                "the policy is hacking the reward model; raise kl_coef or lower the KL target, "
                "and keep the checkpoint from before this stretch",
                d_g,
            )
        return None


class ModeCollapse(Rule):
    """Entropy or distinct-n falling below ``keep`` x its value at the start of the run."""

    name = "mode_collapse"
    metrics = ("entropy", "distinct_2", "distinct_1", "entropy_seq")

    def __init__(self, keep=0.5, baseline=10, recent=5, severity="unhealthy"):
        super().__init__(severity)
        self.keep = _positive("keep", keep)
        self.baseline, self.recent = int(_positive("baseline", baseline)), int(_positive("recent", recent))

    def thresholds(self):
        return (
            f"mean of last {self.recent} steps < {self.keep} x mean of first {self.baseline} steps "
            f"({', '.join(self.metrics)})"
        )

    def min_steps(self):
        return self.baseline + self.recent

    def check(self, history):
        for metric in self.metrics:
            vals = _values(history, metric)
            if len(vals) < self.baseline + self.recent:
                continue
            start = statistics.fmean(vals[: self.baseline])
            now = statistics.fmean(vals[-self.recent :])
            if start > 0 and now < self.keep * start:
                return Finding(
                    f"{metric} collapsed from {start:.3g} to {now:.3g} ({100 * (1 - now / start):.0f}% down): the "
                    "policy is collapsing onto a few outputs (mode collapse); raise kl_coef or add an entropy bonus",
                    now,
                    metric,
                )
        return None


class NegativeKL(Rule):
    """A KL estimate below ``-tol`` for ``patience`` steps in a row.

    Single k1 values are often negative and a batch mean can dip below 0 by
    noise, but the true KL is >= 0: a mean that *stays* negative is a bug.
    """

    name = "negative_kl"
    metrics = ("kl", "kl_seq")

    def __init__(self, patience=10, tol=0.0, severity="unhealthy"):
        super().__init__(severity)
        self.patience, self.tol = int(_positive("patience", patience)), float(tol)

    def thresholds(self):
        return f"kl < -{self.tol} for {self.patience} steps in a row"

    def min_steps(self):
        return self.patience

    def check(self, history):
        metric = self.metric(history)
        if metric is None:
            return None
        vals = _values(history, metric, self.patience)
        if len(vals) == self.patience and history[-1].get(metric) is not None and all(v < -self.tol for v in vals):
            return Finding(
                f"{metric} has been negative for {self.patience} steps (last {vals[-1]:.3g}); the true KL is >= 0, "
                "so logprobs and ref_logprobs are likely swapped, misaligned by one position, masked differently "
                "or computed at different temperatures",
                vals[-1],
            )
        return None


class RolloutMismatch(Rule):
    """The rollout sampler mu drifting from the trained policy pi (e.g. a bf16 / vLLM sampler, fp32 trainer).

    Reads the mismatch KL(mu || pi) per token (``mismatch_k3`` or ``mismatch_kl``,
    nats/token; verl's ``rollout_corr/k3_kl``/``kl``, OpenRLHF's ``vllm_kl``).
    *Warning* when it has been above ``warn`` for ``patience`` steps (default
    0.01 nats/token, a fifth of the trainer's default target_kl of 0.05).
    *Unhealthy* when, after ``warmup`` steps, it has been at least the KL to
    the reference the belt is holding (``kl``, nats/token) for ``patience``
    steps: the KL estimate is then dominated by sampler noise, and the
    controller steers that, not the policy.
    """

    name = "rollout_mismatch"
    metrics = ("mismatch_k3", "mismatch_kl")

    def __init__(self, warn=0.01, patience=3, warmup=10, severity="unhealthy"):
        super().__init__(severity)
        self.warn = _positive("warn", warn)
        self.patience, self.warmup = int(_positive("patience", patience)), int(warmup)

    def thresholds(self):
        return (
            f"KL(sampler||policy) > {self.warn} nats/token (warning) or >= kl, the KL to the reference "
            f"(unhealthy, after {self.warmup} steps), {self.patience} steps in a row"
        )

    def min_steps(self):
        return self.patience

    def missing(self):
        return "not checked: the run logs no sampler/trainer mismatch (mismatch_kl, mismatch_k3; sampler = policy?)"

    def check(self, history):
        metric = self.metric(history)
        if metric is None or history[-1].get(metric) is None:
            return None
        rows = [r for r in history[-self.patience :] if _values([r], metric)]
        if len(rows) < self.patience:
            return None
        mismatch = [float(r[metric]) for r in rows]
        belt = [float(r["kl"]) if _values([r], "kl") else None for r in rows]
        last = mismatch[-1]
        filtered = _values(history[-1:], "filtered_mass")  # a top-k/top-p sampler: the belt's KL is exact, not mu's
        if filtered and all(m > self.warn for m in mismatch):
            return Finding(
                f"the sampling filter (top_k/top_p) drops {filtered[0]:.3g} of the policy's mass per token: the "
                f"rollouts are off-policy for PPO (KL(sampler||policy) {last:.3g} nats/token for {self.patience} "
                "steps); use rollout_correction tis. The logged kl is the exact KL at the visited states, which "
                "the filter does not bias",
                last,
                "filtered",
                "warning",
            )
        if len(history) > self.warmup and all(b is not None and m >= max(b, 0.0) for m, b in zip(mismatch, belt)):
            return Finding(
                f"the sampler/trainer mismatch KL(sampler||policy) {last:.3g} nats/token is at least the KL to the "
                f"reference the belt is holding ({belt[-1]:.3g} nats/token) for {self.patience} steps: the controller "
                "is steering sampler noise; turn on rollout_correction (tis/mis), align sampler and trainer "
                "precision, or stop before the run collapses",
                last,
                "drowned",
                "unhealthy",
            )
        if all(m > self.warn for m in mismatch):
            return Finding(
                f"the sampler/trainer mismatch KL(sampler||policy) is {last:.3g} nats/token (> {self.warn}) for "
                f"{self.patience} steps: the rollouts are off-policy; watch it against the KL to the reference and "
                "use rollout_correction (tis/mis)",
                last,
                "high",
                "warning",
            )
        return None


class StepZeroKL(Rule):
    """A clearly non-zero KL at the run's first logged step, when that step is the first update (0 or 1).

    Before any update the policy *is* its reference, so every KL estimate is 0 there
    (up to rounding). ``|kl| > tol`` nats/token (or ``|kl_seq| > seq_tol`` nats/sequence)
    at that step means the two models were not scored alike.
    """

    name = "step0_kl"
    metrics = ("kl", "kl_seq")

    def __init__(self, tol=1e-3, seq_tol=1e-2, severity="warning"):
        super().__init__(severity)
        self.tol, self.seq_tol = float(_positive("tol", tol)), float(_positive("seq_tol", seq_tol))

    def thresholds(self):
        return f"|kl| > {self.tol} nats/token (or |kl_seq| > {self.seq_tol} nats/sequence) at the first logged step, if it is step 0 or 1"

    def metric(self, history, recent=64):
        """The KL metric, or None when the log's first KL record comes after the first update (nothing to judge)."""
        metric = _first_present(history, self.metrics, None)
        if metric is None:
            return None
        first = next(i for i, r in enumerate(history) if _values([r], metric))
        step = history[first].get("step", first)
        return metric if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= 1 else None

    def missing(self):
        return "not checked: the log has no KL (kl, kl_seq) at step 0 or 1, before the policy moved"

    def check(self, history):
        metric = self.metric(history)
        if metric is None or len(_values(history, metric)) != 1 or not _values(history[-1:], metric):
            return None  # only at the first record that logs the KL
        step = history[-1].get("step", len(history) - 1)
        value = float(history[-1][metric])
        tol = self.tol if metric == "kl" else self.seq_tol
        if abs(value) <= tol:
            return None
        unit = "nats/token" if metric == "kl" else "nats/sequence"
        return Finding(
            f"{metric} is {value:.3g} {unit} at step {step}, before the policy has moved from its reference: the two "
            "are not scored alike. Usual causes: dropout on (call model.eval(); TRL disables dropout with "
            "disable_dropout=True), a reference that is not the starting policy (the bare base model under an SFT "
            "adapter: klbelt's reference 'initial'), or a top-k/top-p sampling filter whose log-probs are taken as "
            "the policy's (score the policy on the full vocabulary)",
            value,
        )


def default_rules() -> list[Rule]:
    """A fresh set of the seven rules a live monitor runs, with their default thresholds."""
    return [KLBand(), MaxKLSpike(), KLRunaway(), RewardHacking(), ModeCollapse(), NegativeKL(), RolloutMismatch()]


def doctor_rules() -> list[Rule]:
    """The rules ``klbelt doctor`` checks a finished run's log with: the live ones and ``step0_kl``."""
    return default_rules() + [StepZeroKL()]


class RuleEngine:
    """Runs rules after every step; emits an :class:`Alert` when a condition starts to hold."""

    def __init__(self, rules=None):
        self.rules = default_rules() if rules is None else list(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rules must have distinct names, got {names}")
        self._active: dict[str, str | None] = {r.name: None for r in self.rules}
        self.alerts: list[Alert] = []

    def observe(self, history) -> list[Alert]:
        """Check every rule at the latest record of ``history``; return the new alerts."""
        if not history:
            return []
        step = history[-1].get("step", len(history) - 1)
        new = []
        for rule in self.rules:
            finding = rule.check(history)
            if finding is None:
                self._active[rule.name] = None
                continue
            if self._active[rule.name] != finding.key:
                alert = Alert(rule.name, finding.severity or rule.severity, int(step), finding.message, float(finding.value))
                new.append(alert)
                self._active[rule.name] = finding.key
        self.alerts.extend(new)
        return new

    def verdicts(self, history) -> list[Verdict]:
        """One :class:`Verdict` per rule from the alerts seen so far."""
        out = []
        for rule in self.rules:
            fired = [a for a in self.alerts if a.rule == rule.name]
            if fired:
                worst = max(reversed(fired), key=lambda a: SEVERITIES.index(a.severity))  # the latest of the worst
                status, message = worst.severity, worst.message
            elif rule.metric(history, recent=None) is None:
                status, message = "n/a", rule.missing()
            elif len(_values(history, rule.metric(history, recent=None))) < rule.min_steps():
                have = len(_values(history, rule.metric(history, recent=None)))
                status, message = "n/a", f"not enough steps ({have} of {rule.min_steps()})"
            else:
                status, message = "ok", "no alert"
            out.append(Verdict(rule.name, rule.severity, status, message, rule.thresholds(), [a.step for a in fired]))
        return out


def diagnose(history, rules=None) -> tuple[list[Verdict], list[Alert]]:
    """Replay a finished run's ``history`` (list of step records) through the rules."""
    engine = RuleEngine(rules)
    history = list(history)
    for i in range(len(history)):
        engine.observe(_Prefix(history, i + 1))
    return engine.verdicts(history), engine.alerts


#: ``exit_code`` when every rule is n/a: the run logs nothing the rules read, or too few steps
NOTHING_CHECKED = 4


def exit_code(verdicts) -> int:
    """0 healthy, 1 warnings, 2 unhealthy, 4 nothing could be checked (every rule n/a; ``klbelt doctor``'s code)."""
    statuses = {v.status for v in verdicts}
    if verdicts and statuses == {"n/a"}:
        return NOTHING_CHECKED
    return 2 if "unhealthy" in statuses else 1 if "warning" in statuses else 0
