"""Layer 3: KL controllers against the article's printout, hand-computed steps and bad input."""

import json
import math

import pytest
import torch

from klbelt import AdaptiveKLController, FixedKLController, PIDKLController, global_observed_kl

ARTICLE_KLS = [0.01, 0.02, 0.05, 0.1, 0.03, 0.02]


def test_article_example_prints_article_trajectory():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.02)
    lines = []
    for step, observed_kl in enumerate(ARTICLE_KLS):
        new_coef = controller.update(observed_kl)
        status = "✓" if 0.01 <= observed_kl <= 0.03 else "⚠"
        lines.append(f"Step {step}: KL = {observed_kl:.3f} → β = {new_coef:.4f} {status}")
    assert lines == [
        "Step 0: KL = 0.010 → β = 0.1000 ✓",
        "Step 1: KL = 0.020 → β = 0.1000 ✓",
        "Step 2: KL = 0.050 → β = 0.1500 ⚠",
        "Step 3: KL = 0.100 → β = 0.2250 ⚠",
        "Step 4: KL = 0.030 → β = 0.2250 ✓",
        "Step 5: KL = 0.020 → β = 0.2250 ✓",
    ]


def test_step_rule_decreases_below_band_and_respects_configurable_bounds():
    c = AdaptiveKLController(0.1, 0.02)
    assert c.update(0.009) == pytest.approx(0.1 / 1.5)
    c = AdaptiveKLController(0.5, 0.02, min_kl_coef=0.2, max_kl_coef=0.6)
    assert c.update(1.0) == 0.6  # 0.75 clipped
    for _ in range(5):
        c.update(0.0)
    assert c.kl_coef == 0.2
    c = AdaptiveKLController(0.1, 0.02)
    for _ in range(20):
        c.update(0.0)
    assert c.kl_coef == 0.01  # the article's floor


def test_proportional_rule_matches_hand_computed_steps():
    c = AdaptiveKLController(0.1, 0.02, horizon=10000, rule="proportional")
    # KL = 0.03: e = 0.5 clipped to 0.2; n/H = 0.1 -> beta = 0.1 * (1 + 0.02)
    assert c.update(0.03, n_steps=1000) == pytest.approx(0.102, rel=1e-12)
    # KL = 0.021: e = 0.05; n/H = 0.05 -> beta *= 1.0025
    assert c.update(0.021, n_steps=500) == pytest.approx(0.102 * 1.0025, rel=1e-12)
    # KL = 0: e = -1 clipped to -0.2; n/H = 0.2 -> beta *= 0.96
    assert c.update(0.0, n_steps=2000) == pytest.approx(0.102 * 1.0025 * 0.96, rel=1e-12)
    # n_steps defaults to 1: KL = 0.01 -> e = -0.5 clipped -> beta *= 1 - 0.2 / 10000
    before = c.kl_coef
    assert c.update(0.01) == pytest.approx(before * (1 - 0.2 / 10000), rel=1e-12)
    # no bounds by default
    big = AdaptiveKLController(0.9, 0.02, horizon=100, rule="proportional")
    assert big.update(1.0, n_steps=100) == pytest.approx(0.9 * 1.2)


def test_proportional_rule_rejects_a_gain_that_could_make_beta_non_positive():
    c = AdaptiveKLController(0.1, 0.02, horizon=100, rule="proportional")
    with pytest.raises(ValueError, match="n_steps / horizon"):
        c.update(0.0, n_steps=500)
    assert c.kl_coef == 0.1


def test_pid_with_pure_integral_is_projected_dual_ascent():
    c = PIDKLController(0.1, 0.5, kp=0.0, ki=0.05, kd=0.0, smoothing=0.0)
    beta = 0.1
    for kl in [0.0, 0.2, 1.5, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 2.0]:
        beta = max(0.0, beta + 0.05 * (kl / 0.5 - 1))
        assert c.update(kl) == pytest.approx(beta, abs=1e-15)


def test_pid_matches_hand_computed_steps():
    c = PIDKLController(0.2, 0.5, kp=0.1, ki=0.05, kd=0.4, smoothing=0.5)
    # step 1: KL 1.0, e = 1; I = 0.2 + 0.05 = 0.25; smoothed = 1.0 (first); no derivative
    assert c.update(1.0) == pytest.approx(0.1 * 1.0 + 0.25)
    # step 2: KL 0.6, e = 0.2; I = 0.26; smoothed = 0.8 -> P = 0.1 * 0.6; fell -> D = 0
    assert c.update(0.6) == pytest.approx(0.06 + 0.26)
    # step 3: KL 1.4, e = 1.8; I = 0.35; smoothed = 1.1 -> P = 0.12; rise 0.3 / 0.5 = 0.6 -> D = 0.24
    assert c.update(1.4) == pytest.approx(0.12 + 0.35 + 0.24)


def test_pid_integral_does_not_wind_up_below_zero_or_above_the_maximum():
    c = PIDKLController(0.1, 0.5, kp=0.0, ki=0.1, kd=0.0, smoothing=0.0, max_kl_coef=0.3)
    for _ in range(50):
        c.update(0.0)
    assert c.kl_coef == 0.0 and c.integral == 0.0
    # one observation above target raises beta at once: no stored debt to pay off first
    assert c.update(1.0) == pytest.approx(0.1)
    for _ in range(50):
        c.update(5.0)
    assert c.kl_coef == 0.3 and c.integral == 0.3
    assert c.update(0.25) == pytest.approx(0.25)  # leaves the maximum at the first step below target


def test_fixed_controller_keeps_its_coefficient():
    c = FixedKLController(0.05, unit="seq-sum")
    assert [c.update(k, n_steps=64) for k in (0.0, 10.0, -0.1)] == [0.05, 0.05, 0.05]
    assert c.unit == "seq-sum"


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedKLController(0.1),
        lambda: AdaptiveKLController(0.1, 0.02),
        lambda: AdaptiveKLController(0.1, 0.02, horizon=20000, rule="proportional", unit="seq-sum"),
        lambda: PIDKLController(0.1, 0.02, kp=0.05, ki=0.02, kd=1.0, smoothing=0.8),
        lambda: PIDKLController(0.1, 0.02, max_kl_coef=0.4),
    ],
)
def test_state_dict_round_trip_mid_run_continues_identically(make):
    gen = torch.Generator().manual_seed(0)
    kls = (torch.rand(40, generator=gen, dtype=torch.float64) * 0.06).tolist()
    a = make()
    for kl in kls[:20]:
        a.update(kl, n_steps=256)
    state = json.loads(json.dumps(a.state_dict()))  # must be plain JSON
    b = make()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    rest_a = [a.update(kl, n_steps=256) for kl in kls[20:]]
    rest_b = [b.update(kl, n_steps=256) for kl in kls[20:]]
    assert rest_a == rest_b


def test_state_dict_keeps_an_unbounded_maximum_unbounded():
    a = AdaptiveKLController(0.1, 0.02, rule="step", max_kl_coef=math.inf)
    b = AdaptiveKLController(0.1, 0.02)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.max_kl_coef == math.inf


def test_load_state_dict_rejects_foreign_or_broken_state():
    pid = PIDKLController()
    with pytest.raises(ValueError, match="AdaptiveKLController"):
        pid.load_state_dict(AdaptiveKLController().state_dict())
    state = pid.state_dict()
    del state["integral"]
    with pytest.raises(ValueError, match="missing integral"):
        pid.load_state_dict(state)
    state = pid.state_dict()
    state["kl_coef"] = float("nan")
    with pytest.raises(ValueError, match="kl_coef"):
        pid.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        pid.load_state_dict([1, 2])


@pytest.mark.parametrize("make", [FixedKLController, AdaptiveKLController, PIDKLController])
def test_update_accepts_a_float_or_a_zero_dim_tensor(make):
    a, b = make(), make()
    for kl in (0.05, 0.001, 0.03):
        assert a.update(kl) == b.update(torch.tensor(kl, dtype=torch.float64))
    assert isinstance(b.kl_coef, float)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: AdaptiveKLController(target_kl=0.0), ValueError, "target_kl must be > 0"),
        (lambda: AdaptiveKLController(target_kl=-1), ValueError, "target_kl must be > 0"),
        (lambda: PIDKLController(target_kl=float("nan")), ValueError, "target_kl must be finite"),
        (lambda: AdaptiveKLController(horizon=0), ValueError, "horizon must be > 0"),
        (lambda: AdaptiveKLController(init_kl_coef=float("inf")), ValueError, "init_kl_coef must be finite"),
        (lambda: AdaptiveKLController(init_kl_coef=0.0), ValueError, "init_kl_coef must be > 0"),
        (lambda: AdaptiveKLController(init_kl_coef=2.0), ValueError, "init_kl_coef must lie within"),
        (lambda: AdaptiveKLController(rule="pid"), ValueError, "rule must be one of"),
        (lambda: AdaptiveKLController(unit="nats"), ValueError, "unit must be one of"),
        (lambda: AdaptiveKLController(min_kl_coef=0.5, max_kl_coef=0.1, init_kl_coef=0.2), ValueError, "min_kl_coef"),
        (lambda: AdaptiveKLController(step_factor=1.0), ValueError, "step_factor must be > 1"),
        (lambda: AdaptiveKLController(step_band=(0.5,)), TypeError, "step_band"),
        (lambda: AdaptiveKLController(step_band=(1.2, 1.5)), ValueError, "step_band"),
        (lambda: FixedKLController(-0.1), ValueError, "kl_coef must be >= 0"),
        (lambda: FixedKLController("0.1"), TypeError, "kl_coef must be a real number"),
        (lambda: PIDKLController(init_kl_coef=-1), ValueError, "init_kl_coef must be >= 0"),
        (lambda: PIDKLController(ki=-0.1), ValueError, "ki must be >= 0"),
        (lambda: PIDKLController(smoothing=1.0), ValueError, "smoothing must be in"),
        (lambda: PIDKLController(init_kl_coef=0.5, max_kl_coef=0.2), ValueError, "init_kl_coef must be <="),
    ],
)
def test_bad_configuration_is_rejected_with_the_argument_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make", [FixedKLController, AdaptiveKLController, PIDKLController])
@pytest.mark.parametrize(
    "kl, n_steps, exc, match",
    [
        (float("nan"), 1, ValueError, "observed_kl must be finite"),
        (float("inf"), 1, ValueError, "observed_kl must be finite"),
        (torch.tensor(float("nan")), 1, ValueError, "observed_kl must be finite"),
        (torch.tensor([0.1, 0.2]), 1, TypeError, "observed_kl must be a real number or a one-element tensor"),
        ("0.1", 1, TypeError, "observed_kl must be a real number"),
        (0.1, 0, ValueError, "n_steps must be a positive int"),
        (0.1, 2.0, TypeError, "n_steps must be a positive int"),
    ],
)
def test_bad_update_input_is_rejected_and_leaves_beta_unchanged(make, kl, n_steps, exc, match):
    c = make()
    before = c.state_dict()
    with pytest.raises(exc, match=match):
        c.update(kl, n_steps=n_steps)
    assert c.state_dict() == before


def test_negative_observed_kl_is_accepted():
    # a k1 estimate of a small KL can be negative; it is a valid observation below target
    c = AdaptiveKLController(0.1, 0.02)
    assert c.update(-0.01) == pytest.approx(0.1 / 1.5)


def test_global_observed_kl_without_distributed_is_the_local_mean():
    assert float(global_observed_kl(3.0, 4)) == 0.75
    assert float(global_observed_kl(torch.tensor(3.0), torch.tensor(0))) == 0.0
    with pytest.raises(ValueError, match="count must be >= 0"):
        global_observed_kl(1.0, -1)
    with pytest.raises(ValueError, match="kl_sum must be finite"):
        global_observed_kl(float("nan"), 1)
    with pytest.raises(ValueError, match="not initialized"):
        global_observed_kl(1.0, 1, group=object())


def test_pid_warmup_keeps_beta_while_the_policy_leaves_the_reference():
    # an RLHF trainer's first KL is exactly 0 (rollouts drawn before any update); relative error -1
    plain = PIDKLController(0.1, target_kl=0.05, kp=0.12, ki=0.02, kd=1.0)
    warm = PIDKLController(0.1, target_kl=0.05, kp=0.12, ki=0.02, kd=1.0, warmup=3)
    start = [0.0, 0.004, 0.02]
    assert [plain.update(k) for k in start][0] == 0.0  # the bug: beta sent to 0 by the first, meaningless, zero
    assert all(b >= 0.1 for b in [warm.update(k) for k in start])  # rises still add the D term
    assert warm.integral == 0.1  # KL below target during warm-up does not lower the integral
    # after the warm-up a low KL lowers beta as before; a high one during it raises beta
    assert warm.update(0.01) < 0.1
    hot = PIDKLController(0.1, target_kl=0.05, warmup=3)
    assert hot.update(0.2) > 0.1 and hot.integral > 0.1


def test_pid_floor_holds_beta_and_integral_and_checks_its_bounds():
    c = PIDKLController(0.1, target_kl=0.05, min_kl_coef=0.03)
    for _ in range(50):
        c.update(0.0)
    assert c.kl_coef == c.integral == 0.03
    with pytest.raises(ValueError, match="init_kl_coef must be >= min_kl_coef"):
        PIDKLController(0.01, target_kl=0.05, min_kl_coef=0.03)
    with pytest.raises(ValueError, match=r"min_kl_coef \(0.5\) must be <= max_kl_coef"):
        PIDKLController(0.1, target_kl=0.05, min_kl_coef=0.5, max_kl_coef=0.2)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        PIDKLController(0.1, target_kl=0.05, warmup=-1)


def test_pid_resumes_mid_warmup_and_loads_states_saved_before_warmup_existed():
    a = PIDKLController(0.1, target_kl=0.05, warmup=4, min_kl_coef=0.02, smoothing=0.5)
    kls = [0.0, 0.01, 0.03, 0.08, 0.06, 0.02, 0.05]
    for k in kls[:2]:
        a.update(k)
    b = PIDKLController()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.update(k) for k in kls[2:]] == [b.update(k) for k in kls[2:]]
    old = a.state_dict()
    for key in ("warmup", "min_kl_coef"):
        del old["config"][key]  # a checkpoint written before these settings: their defaults (off)
    c = PIDKLController()
    c.load_state_dict(old)
    assert c.warmup == 0 and c.min_kl_coef == 0.0
