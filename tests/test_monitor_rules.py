"""Each health rule fires on a history built to trigger it and stays silent on a healthy run."""

from __future__ import annotations

import math
import random

import pytest

from klbelt.monitor import (
    KLBand,
    KLRunaway,
    MaxKLSpike,
    ModeCollapse,
    NegativeKL,
    RewardHacking,
    StepZeroKL,
    doctor_rules,
    diagnose,
    exit_code,
)


def healthy(n=200, seed=0):
    """KL rises from ~0 and plateaus at 0.05 nats/token; proxy and gold reward rise together."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        kl = 0.05 * (1 - math.exp(-t / 20)) * (1 + 0.03 * rng.gauss(0, 1))
        out.append(
            {
                "step": t,
                "kl": kl,
                "kl_max": 8 * kl + 0.02 * abs(rng.gauss(0, 1)),
                "kl_seq": 20 * kl,
                "kl_coef": 0.1,
                "reward": 1 - math.exp(-t / 30) + 0.05 * rng.gauss(0, 1),
                "gold_reward": 0.8 * (1 - math.exp(-t / 30)) + 0.05 * rng.gauss(0, 1),
                "entropy": 3.0 + 0.05 * rng.gauss(0, 1),
                "distinct_2": 0.8 + 0.01 * rng.gauss(0, 1),
                "mismatch_kl": 2e-4,  # a bf16 sampler's KL(sampler || policy), far below the belt's KL
            }
        )
    return out


def with_(history, metric, fn):
    for r in history:
        r[metric] = fn(r["step"], r[metric])
    return history


def fired(history, rule):
    verdicts, alerts = diagnose(history, [rule])
    return [a.step for a in alerts], verdicts[0]


TRIGGERS = {
    "kl_band high": (KLBand(), lambda h: with_(h, "kl", lambda t, v: 0.3)),
    "kl_band low": (KLBand(), lambda h: with_(h, "kl", lambda t, v: 0.002)),
    "max_kl_spike": (MaxKLSpike(), lambda h: with_(h, "kl_max", lambda t, v: 25.0 if t == 120 else v)),
    "kl_runaway": (KLRunaway(), lambda h: with_(h, "kl", lambda t, v: 0.001 * t + v * 0.01)),
    "reward_hacking": (
        RewardHacking(),
        lambda h: with_(
            with_(h, "reward", lambda t, v: v + (0.02 * (t - 100) if t > 100 else 0)),
            "gold_reward",
            lambda t, v: v - (0.02 * (t - 100) if t > 100 else 0),
        ),
    ),
    "mode_collapse entropy": (ModeCollapse(), lambda h: with_(h, "entropy", lambda t, v: v * math.exp(-t / 40))),
    "mode_collapse distinct_2": (ModeCollapse(), lambda h: with_(h, "distinct_2", lambda t, v: 0.8 / (1 + t / 20))),
    "negative_kl": (NegativeKL(), lambda h: with_(h, "kl", lambda t, v: -0.02 - v if t > 150 else v)),
    "step0_kl": (StepZeroKL(), lambda h: with_(h, "kl", lambda t, v: 0.02 if t == 0 else v)),
}


@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_rule_fires_on_history_built_to_trigger_it(case):
    rule, make = TRIGGERS[case]
    steps, verdict = fired(make(healthy()), rule)
    assert steps, f"{case}: no alert"
    assert verdict.status == rule.severity and verdict.fired_at == steps
    assert verdict.message and verdict.thresholds


@pytest.mark.parametrize("rule", doctor_rules(), ids=lambda r: r.name)
def test_rule_is_silent_on_a_healthy_run_that_rises_then_plateaus(rule):
    steps, verdict = fired(healthy(), rule)
    assert steps == [] and verdict.status == "ok"


def test_healthy_run_exits_0_and_each_trigger_raises_the_exit_code():
    verdicts, alerts = diagnose(healthy())
    assert alerts == [] and exit_code(verdicts) == 0
    assert exit_code(diagnose(TRIGGERS["kl_band high"][1](healthy()))[0]) == 1  # warning
    assert exit_code(diagnose(TRIGGERS["kl_runaway"][1](healthy()))[0]) == 2  # unhealthy


def test_spike_alert_names_the_step_and_the_ratio():
    steps, verdict = fired(TRIGGERS["max_kl_spike"][1](healthy()), MaxKLSpike())
    assert steps == [120]
    assert "kl_max spiked to 25" in verdict.message and "x the median" in verdict.message


def test_band_messages_are_the_articles():
    _, v_high = fired(TRIGGERS["kl_band high"][1](healthy()), KLBand())
    _, v_low = fired(TRIGGERS["kl_band low"][1](healthy()), KLBand())
    assert v_high.message.startswith("drifting") and "reward-hacking risk" in v_high.message
    assert v_low.message.startswith("barely moving") and "beta" in v_low.message


def test_low_kl_at_the_start_is_not_an_alert():
    # KL starts near zero by design (the policy is a copy of the reference)
    h = healthy(12)
    steps, _ = fired(h, KLBand(warmup=10, patience=5))
    assert steps == []


def test_an_alert_fires_once_per_episode_and_again_after_it_clears():
    h = [{"step": t, "kl": 0.3 if (20 <= t < 40 or 60 <= t < 80) else 0.05} for t in range(100)]
    steps, _ = fired(h, KLBand())
    assert steps == [24, 64]


def test_rule_without_its_metric_is_not_applicable():
    h = [{k: v for k, v in r.items() if k != "gold_reward"} for r in healthy()]
    _, verdict = fired(h, RewardHacking())
    assert verdict.status == "n/a" and "gold_reward" in verdict.message


def test_per_sequence_kl_is_never_judged_against_the_per_token_band():
    h = [{"step": r["step"], "kl_seq": 5.0} for r in healthy()]  # 5 nats/sequence is fine
    _, verdict = fired(h, KLBand())
    assert verdict.status == "n/a"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KLBand(low=0.1, high=0.01), "low must be < high"),
        (lambda: MaxKLSpike(factor=0), "factor must be a number > 0"),
        (lambda: NegativeKL(severity="fatal"), "severity must be one of"),
        (lambda: RewardHacking(window=2), "window must be >= 4"),
    ],
)
def test_bad_thresholds_are_rejected_with_the_argument_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_step0_kl_names_the_usual_causes_and_ignores_a_run_first_logged_later():
    steps, verdict = fired(TRIGGERS["step0_kl"][1](healthy()), StepZeroKL())
    assert steps == [0] and "dropout" in verdict.message and "reference" in verdict.message and "top-k" in verdict.message
    later = [r for r in TRIGGERS["step0_kl"][1](healthy()) if r["step"] >= 10]  # first logged at step 10: KL may be > 0
    later[0]["kl"] = 0.05
    assert fired(later, StepZeroKL())[0] == []


def test_rollout_mismatch_from_a_sampling_filter_is_a_warning_not_a_drowned_kl():
    """Under top-k/top-p the belt's KL is the exact one: a filter's large KL(mu || pi) does not drown it."""
    from klbelt.monitor import RolloutMismatch

    h = [{"step": t, "kl": 0.02, "mismatch_k3": 0.1, "filtered_mass": 0.09} for t in range(20)]
    steps, verdict = fired(h, RolloutMismatch())
    assert steps == [2] and verdict.status == "warning" and "filter" in verdict.message
    unfiltered = [{k: v for k, v in r.items() if k != "filtered_mass"} for r in h]
    assert fired(unfiltered, RolloutMismatch())[1].status == "unhealthy"  # a sampler's noise above the KL still is
