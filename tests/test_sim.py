"""The exact testbed: optimisation reaches the closed-form optimum; controllers hold a target."""

import math

import numpy as np
import pytest
import torch

from klbelt.control import AdaptiveKLController, PIDKLController
from klbelt.sim import kl_coef_for_target, max_kl, optimum, simulate
from klbelt.sim.compare import compare_controllers, step_response

PROBLEMS = {
    "three": ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0]),
    "eight": ((np.arange(8, 0, -1) / 36.0).tolist(), np.linspace(0, 1, 8).tolist()),
    "ties": ([0.1, 0.4, 0.25, 0.25], [0.5, -1.0, 0.5, 2.0]),
}


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_closed_form_kl_equals_the_kl_of_the_gibbs_policy(name, beta):
    ref, r = (torch.tensor(x, dtype=torch.float64) for x in PROBLEMS[name])
    opt = optimum(ref, r, beta)
    pi = ref * torch.exp(r / beta)
    pi = pi / pi.sum()
    assert opt.probs == pytest.approx(pi.tolist(), rel=1e-10)
    assert opt.kl == pytest.approx(float((pi * (pi / ref).log()).sum()), rel=1e-9, abs=1e-14)
    # beta log Z is the optimal value of E[r] - beta KL
    assert opt.objective == pytest.approx(beta * opt.log_partition, rel=1e-9)


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_exact_gradient_optimisation_matches_closed_form_kl_within_1_percent(name, beta):
    ref, r = PROBLEMS[name]
    res = simulate(ref, r, beta, steps=100, inner_steps=10, lr=0.1)
    assert res.kl[-1] == pytest.approx(optimum(ref, r, beta).kl, rel=0.01)


def _tail_stats(res, start):
    tail = np.asarray(res.kl[start:])
    return tail.mean(), tail.std()


@pytest.mark.parametrize("name, beta", [("three", 0.5), ("eight", 0.3), ("ties", 1.0)])
def test_sampled_gradients_with_k1_in_reward_converge_to_the_same_optimum(name, beta):
    ref, r = PROBLEMS[name]
    res = simulate(ref, r, beta, gradient="sampled", estimator="k1", kl_in="reward", steps=150, inner_steps=4,
                   batch_size=256, lr=0.02, seed=1)
    mean, sd = _tail_stats(res, 75)
    target = optimum(ref, r, beta).kl
    # tolerance from the sampling noise: the spread of the iterates around their mean, plus a 0.5% floor.
    # (at the optimum every response's shaped return is beta * log Z, so the k1 estimator's noise vanishes)
    assert abs(mean - target) <= 3 * sd + 0.005 * target


def test_sampled_gradients_with_k2_as_loss_converge_to_the_optimum_and_k3_as_loss_does_not():
    ref, r = PROBLEMS["three"]
    target = optimum(ref, r, 0.5).kl
    k2 = simulate(ref, r, 0.5, gradient="sampled", estimator="k2", kl_in="loss", steps=150, inner_steps=4, lr=0.02)
    mean, sd = _tail_stats(k2, 75)
    assert sd > 0 and abs(mean - target) <= 3 * sd + 0.005 * target
    # k3 as a loss follows the gradient of the forward KL(ref || pi): it converges to the maximiser of
    # E[r] - beta KL(ref || pi), pi(y) = beta ref(y) / (lam - r(y)) with lam in (max r, max r + beta] normalising
    k3 = simulate(ref, r, 0.5, gradient="sampled", estimator="k3", kl_in="loss", steps=150, inner_steps=4, lr=0.02)
    mean3, sd3 = _tail_stats(k3, 75)
    ref_t, r_t = torch.tensor(ref, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    lo, hi = float(r_t.max()), float(r_t.max()) + 0.5
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if float((0.5 * ref_t / (lam - r_t)).sum()) > 1 else (lo, lam)
    pi_fwd = 0.5 * ref_t / (lam - r_t)
    kl_fwd = float((pi_fwd * (pi_fwd / ref_t).log()).sum())
    assert abs(mean3 - kl_fwd) <= 3 * sd3 + 0.005 * kl_fwd
    assert abs(kl_fwd - target) > 0.01 * target


def test_optimal_kl_decreases_in_beta_and_is_bounded_by_minus_log_ref_of_the_best_response():
    ref, r = PROBLEMS["eight"]
    kls = [optimum(ref, r, b).kl for b in np.geomspace(1e-3, 1e2, 40)]
    assert all(a >= b - 1e-9 for a, b in zip(kls, kls[1:]))  # up to float64 cancellation at tiny beta and kls[10] > kls[20] > kls[30]
    assert kls[0] == pytest.approx(max_kl(ref, r), rel=1e-6) and max_kl(ref, r) == pytest.approx(math.log(36))


def test_kl_coef_for_target_inverts_the_closed_form():
    ref, r = PROBLEMS["eight"]
    beta = kl_coef_for_target(ref, r, 0.5)
    assert optimum(ref, r, beta).kl == pytest.approx(0.5, rel=1e-8)
    with pytest.raises(ValueError, match="target_kl must be below"):
        kl_coef_for_target(ref, r, 4.0)


def test_step_response_metrics_on_a_known_series():
    kl = [0.0, 0.3, 0.6, 0.8, 0.54, 0.45, 0.52, 0.5, 0.49, 0.51, 0.5, 0.5]
    m = step_response(kl, 0.5)
    assert m.settling_step == 5  # from the 5th value (0.54) on, all within 10% of 0.5
    assert m.overshoot == pytest.approx(0.6)  # 0.8 after first reaching 0.5
    assert m.steady_state_error == pytest.approx(np.mean([0.02, 0.0, 0.0]))
    assert m.tail_in_band == 1.0
    never = step_response([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.2], 0.5)
    assert never.settling_step is None
    assert step_response([0.1, 0.2], 0.5).overshoot is None  # never reached the target


def test_controllers_hold_the_target_in_the_testbed():
    out = compare_controllers(steps=200)
    runs = out["runs"]
    for name in ("proportional", "pid"):
        exact = runs[name]["exact"]
        assert exact["settling_step"] is not None, name
        assert exact["steady_state_error"] < 0.05, name
        assert runs[name]["final_kl_coef"] == pytest.approx(out["kl_coef_for_target"], rel=0.1), name
    pid, step = runs["pid"]["exact"], runs["step"]["exact"]
    assert step["settling_step"] is None or pid["settling_step"] < step["settling_step"]
    assert pid["settling_step"] < runs["proportional"]["exact"]["settling_step"]


def test_simulate_runs_any_controller_and_records_its_trajectory():
    ref, r = PROBLEMS["three"]
    c = AdaptiveKLController(0.1, 0.3, rule="step")
    res = simulate(ref, r, c, steps=20, inner_steps=2)
    assert len(res.kl) == len(res.kl_coef) == len(res.observed_kl) == 20
    assert res.kl_coef[-1] == c.kl_coef and c.n_updates == 20
    # with exact gradients the observation is the exact KL during the phase
    assert res.observed_kl[0] > 0 and res.init_kl_coef == 0.1
    pid = PIDKLController(0.1, 0.3)
    res = simulate(ref, r, pid, steps=5, gradient="sampled", batch_size=16)
    assert len(res.kl_coef) == 5


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(ref_probs=[0.5, 0.6], reward=[1, 0]), ValueError, "ref_probs must sum to 1"),
        (dict(ref_probs=[1.0, 0.0], reward=[1, 0]), ValueError, "ref_probs must be > 0"),
        (dict(ref_probs=[1.0], reward=[1]), ValueError, "ref_probs must be a 1-d vector of at least 2"),
        (dict(ref_probs=[0.5, 0.5], reward=[1, 0, 0]), ValueError, "reward must have one entry per response"),
        (dict(ref_probs=[0.5, 0.5], reward=[1, float("nan")]), ValueError, "reward contains NaN"),
        (dict(ref_probs="abc", reward=[1, 0]), TypeError, "ref_probs must be a sequence of numbers"),
        (dict(controller=-1.0), ValueError, "kl_coef.* must be >= 0"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(inner_steps=1.5), TypeError, "inner_steps must be an int"),
        (dict(batch_size=1), ValueError, "batch_size must be >= 2"),
        (dict(gradient="reinforce"), ValueError, "gradient must be one of"),
        (dict(estimator="k4"), ValueError, "estimator must be one of"),
        (dict(kl_in="advantage"), ValueError, "kl_in must be one of"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer must be one of"),
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(init_logits=[0.0, 1.0, 2.0]), ValueError, "init_logits must have one entry per response"),
    ],
)
def test_bad_testbed_input_is_rejected_with_the_argument_named(kwargs, exc, match):
    args = dict(ref_probs=[0.5, 0.5], reward=[1.0, 0.0], controller=0.1, steps=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        simulate(args.pop("ref_probs"), args.pop("reward"), args.pop("controller"), **args)


def test_optimum_rejects_a_non_positive_beta():
    with pytest.raises(ValueError, match="kl_coef must be > 0"):
        optimum([0.5, 0.5], [1, 0], 0.0)
