"""Claims about the sample estimators k1, k2, k3 (and abs) of KL(policy || ref).

Two independent truths are used:

* Gaussians (Schulman, "Approximating KL divergence", 2020). Samples
  x ~ q = N(0, 1) (the sampling policy), p = N(mu, 1) (the reference),
  r = p(x)/q(x). Then log r = mu*x - mu^2/2 is itself Gaussian,
  log r ~ N(-mu^2/2, mu^2), and with KL = KL(q||p) = mu^2/2:

    k1 = -log r              E = mu^2/2            Var = mu^2
    k2 = (log r)^2 / 2       E = (Var + mean^2)/2 = mu^2/2 + mu^4/8
                             Var = (2 s^4 + 4 m^2 s^2)/4 = mu^4/2 + mu^6/4
    k3 = (r - 1) - log r     E = E[r] - 1 + mu^2/2 = mu^2/2   (E_q[r] = 1)
                             Var = Var(r) + Var(log r) - 2 Cov(r, log r)
                                 = (e^{mu^2} - 1) + mu^2 - 2 mu^2
                                 = e^{mu^2} - 1 - mu^2
    using E[r^2] = e^{mu^2} and, by Stein's lemma for L ~ N(m, s^2),
    E[L e^L] = (m + s^2) E[e^L], so Cov(r, log r) = mu^2/2 + mu^2/2 = mu^2.

  So k2's bias is exactly mu^4/8: neither "mu^2/4" nor "mu^4/4" is right.
  In klbelt's convention logprobs = log q(x) (the sampling policy) and
  ref_logprobs = log p(x), so lr = logprobs - ref_logprobs = -log r and klbelt's
  k1 = lr, k2 = lr^2/2, k3 = exp(-lr) - 1 + lr are exactly the three above.

* Exact enumeration over a small vocabulary in float64: expectations are sums
  weighted by pi(y), gradients are compared with the analytic gradients of the
  two KL directions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import klbelt
from klbelt import kl_per_token, logprobs_from_logits, shape_rewards

MUS = [0.25, 0.5, 1.0, 2.0]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_logprobs(x: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(x), log p(x)) with q = N(0, 1) sampling and p = N(mu, 1) the reference."""
    return -0.5 * x.square() - LOG_SQRT_2PI, -0.5 * (x - mu).square() - LOG_SQRT_2PI


def closed_form_mean(estimator: str, mu: float) -> float:
    kl = mu**2 / 2
    return {"k1": kl, "k2": kl + mu**4 / 8, "k3": kl}[estimator]


def closed_form_var(estimator: str, mu: float) -> float:
    return {"k1": mu**2, "k2": mu**4 / 2 + mu**6 / 4, "k3": math.expm1(mu**2) - mu**2}[estimator]


# ----------------------------------------------------------------- Gaussians, deterministic quadrature


def gauss_hermite(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights with sum_i w_i f(x_i) = E_{x~N(0,1)}[f(x)] for smooth f."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(x), torch.from_numpy(w / w.sum())


@pytest.mark.parametrize("mu", MUS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimator_moments_match_gaussian_closed_forms_by_quadrature(estimator, mu):
    # Gauss-Hermite quadrature is exact to rounding for these entire integrands,
    # so mean and variance of klbelt's estimator must match the closed forms tightly.
    x, w = gauss_hermite()
    lp, ref = gaussian_logprobs(x, mu)
    k = kl_per_token(lp, ref, estimator)
    mean = (w * k).sum().item()
    var = (w * (k - mean).square()).sum().item()
    assert mean == pytest.approx(closed_form_mean(estimator, mu), rel=1e-9, abs=1e-12)
    assert var == pytest.approx(closed_form_var(estimator, mu), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_k2_bias_is_exactly_mu4_over_8_not_mu2_over_4(mu):
    x, w = gauss_hermite()
    lp, ref = gaussian_logprobs(x, mu)
    bias = (w * kl_per_token(lp, ref, "k2")).sum().item() - mu**2 / 2
    assert bias == pytest.approx(mu**4 / 8, rel=1e-9)
    # the two other readings of the bias are wrong by a visible margin
    assert abs(bias - mu**2 / 4) > 0.4 * bias
    assert abs(bias - mu**4 / 4) > 0.4 * bias


# ----------------------------------------------------------------- Gaussians, Monte Carlo

N_SAMPLES = 400_000


def mc_estimates(mu: float, estimator: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(N_SAMPLES, generator=gen, dtype=torch.float64)
    lp, ref = gaussian_logprobs(x, mu)
    return kl_per_token(lp, ref, estimator)


@pytest.mark.parametrize("mu", MUS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_reverse_kl(estimator, mu, gen):
    k = mc_estimates(mu, estimator, gen)
    standard_error = math.sqrt(closed_form_var(estimator, mu) / N_SAMPLES)
    assert abs(k.mean().item() - mu**2 / 2) < 5 * standard_error


@pytest.mark.parametrize("mu", MUS)
def test_k2_is_biased_upward_by_mu4_over_8(mu, gen):
    k = mc_estimates(mu, "k2", gen)
    standard_error = math.sqrt(closed_form_var("k2", mu) / N_SAMPLES)
    mean = k.mean().item()
    assert abs(mean - (mu**2 / 2 + mu**4 / 8)) < 5 * standard_error
    if mu >= 0.5:  # the bias is resolvable from the samples: the unbiased value is rejected
        assert abs(mean - mu**2 / 2) > 5 * standard_error


@pytest.mark.parametrize("mu", [0.25, 0.5, 1.0])
def test_k3_variance_is_exp_mu2_minus_1_minus_mu2(mu, gen):
    k = mc_estimates(mu, "k3", gen)
    centered = k - k.mean()
    sample_var = centered.square().mean().item()
    # standard error of a sample variance: sqrt((m4 - var^2) / n), m4 the 4th central moment
    m4 = centered.pow(4).mean().item()
    standard_error = math.sqrt((m4 - sample_var**2) / N_SAMPLES)
    assert abs(sample_var - (math.exp(mu**2) - 1 - mu**2)) < 5 * standard_error


@pytest.mark.parametrize("mu", [0.25, 0.5])
def test_k3_has_lower_variance_than_k1_near_the_reference(mu):
    # e^{mu^2} - 1 - mu^2 ~ mu^4/2 << mu^2 for small mu: why k3 is preferred
    x, w = gauss_hermite()
    lp, ref = gaussian_logprobs(x, mu)
    variances = {}
    for est in ("k1", "k3"):
        k = kl_per_token(lp, ref, est)
        variances[est] = (w * (k - (w * k).sum()).square()).sum().item()
    assert variances["k3"] < 0.2 * variances["k1"]


# ----------------------------------------------------------------- elementwise formulas


def test_estimators_match_their_formulas_on_hand_picked_log_ratios():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.0 - math.log(2), -2.0 + math.log(2), -0.5, -1.0], dtype=torch.float64)
    # lr = [log 2, -log 2, 0, -2]
    expected = {
        "k1": [math.log(2), -math.log(2), 0.0, -2.0],
        "k2": [math.log(2) ** 2 / 2, math.log(2) ** 2 / 2, 0.0, 2.0],
        # exp(-lr) - 1 + lr
        "k3": [0.5 - 1 + math.log(2), 2 - 1 - math.log(2), 0.0, math.exp(2) - 3],
        "abs": [math.log(2), math.log(2), 0.0, 2.0],
    }
    for est, values in expected.items():
        got = kl_per_token(lp, ref, est)
        assert got.dtype == torch.float64 and got.shape == lp.shape
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_k1_is_the_default_estimator():
    lp = torch.tensor([[-1.0, -0.2]])
    ref = torch.tensor([[-0.5, -0.7]])
    torch.testing.assert_close(kl_per_token(lp, ref), torch.tensor([[-0.5, 0.5]]))


@pytest.mark.parametrize("estimator", ["k2", "k3", "abs"])
def test_k2_k3_and_abs_are_never_negative(estimator, gen):
    lp = -torch.rand(1000, generator=gen, dtype=torch.float64) * 10
    ref = -torch.rand(1000, generator=gen, dtype=torch.float64) * 10
    assert (kl_per_token(lp, ref, estimator) >= 0).all()


@pytest.mark.parametrize(
    "dtype, lr, rtol",
    [(torch.float64, 1e-6, 1e-6), (torch.float64, 1e-3, 1e-9), (torch.float32, 1e-3, 2e-3), (torch.float32, -1e-3, 2e-3)],
)
def test_k3_stays_accurate_for_tiny_log_ratios(dtype, lr, rtol):
    # exp(-l) - 1 + l = l^2/2 - l^3/6 + ...: naive evaluation loses every digit here
    ref = torch.tensor([-1.0], dtype=dtype)
    lp = ref + lr
    exact_lr = (lp.double() - ref.double()).item()  # the log-ratio actually represented
    truth = exact_lr**2 / 2 - exact_lr**3 / 6 + exact_lr**4 / 24
    assert kl_per_token(lp, ref, "k3").item() == pytest.approx(truth, rel=rtol)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_estimator_gradients_wrt_both_inputs_match_the_derivative_of_the_formula(estimator, gen):
    lp = (-torch.rand(6, generator=gen, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    ref = (-torch.rand(6, generator=gen, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    weights = torch.randn(6, generator=gen, dtype=torch.float64)
    (kl_per_token(lp, ref, estimator) * weights).sum().backward()
    lr = (lp - ref).detach()
    d_dlr = {"k1": torch.ones_like(lr), "k2": lr, "k3": 1 - torch.exp(-lr), "abs": torch.sign(lr)}[estimator]
    torch.testing.assert_close(lp.grad, weights * d_dlr, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref.grad, -weights * d_dlr, rtol=1e-12, atol=1e-14)


def test_estimators_keep_the_shape_of_any_leading_dims():
    lp = -torch.rand(2, 3, 4, dtype=torch.float64)
    ref = -torch.rand(2, 3, 4, dtype=torch.float64)
    for est in klbelt.ESTIMATORS:
        assert kl_per_token(lp, ref, est).shape == (2, 3, 4)
    assert kl_per_token(lp[:0], ref[:0], "k3").shape == (0, 3, 4)


# ----------------------------------------------------------------- exact enumeration over a small vocabulary

V = 5


def small_policy_and_ref(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    ref_logits = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    return theta, ref_logits


def token_logprobs(theta: torch.Tensor, source: str) -> torch.Tensor:
    """log pi(y) for every y in the vocabulary, differentiable in theta."""
    if source == "torch":
        return torch.log_softmax(theta, dim=-1)
    return logprobs_from_logits(theta.expand(V, V), torch.arange(V))


def direct_kls(theta: torch.Tensor, ref_logits: torch.Tensor):
    """KL(pi||ref), KL(ref||pi) and their analytic gradients wrt theta (pi = softmax(theta))."""
    pi = torch.softmax(theta.detach(), -1)
    ref = torch.softmax(ref_logits, -1)
    log_ratio = pi.log() - ref.log()
    reverse = (pi * log_ratio).sum()
    forward = (ref * -log_ratio).sum()
    # d/dtheta sum_y pi_y (log pi_y - log ref_y) = pi * (log_ratio - KL);  d/dtheta KL(ref||pi) = pi - ref
    return reverse, forward, pi * (log_ratio - reverse), pi - ref


SEEDS = [0, 1, 2]
SOURCES = ["torch", "klbelt"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_expectations_equal_the_exact_reverse_kl_by_enumeration(estimator, seed):
    theta, ref_logits = small_policy_and_ref(seed)
    pi = torch.softmax(theta.detach(), -1)
    k = kl_per_token(torch.log_softmax(theta.detach(), -1), torch.log_softmax(ref_logits, -1), estimator)
    reverse, *_ = direct_kls(theta, ref_logits)
    assert (pi * k).sum().item() == pytest.approx(reverse.item(), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_k2_expectation_exceeds_the_exact_reverse_kl_by_enumeration(seed):
    theta, ref_logits = small_policy_and_ref(seed)
    pi = torch.softmax(theta.detach(), -1)
    lr = torch.log_softmax(theta.detach(), -1) - torch.log_softmax(ref_logits, -1)
    k2 = kl_per_token(torch.log_softmax(theta.detach(), -1), torch.log_softmax(ref_logits, -1), "k2")
    reverse, *_ = direct_kls(theta, ref_logits)
    assert (pi * k2).sum().item() == pytest.approx(0.5 * (pi * lr**2).sum().item(), rel=1e-12)
    assert (pi * k2).sum().item() != pytest.approx(reverse.item(), rel=1e-3)


def on_policy_loss_gradient(theta, ref_logits, estimator, source):
    """grad of sum_y pi(y).detach() * k(y) -- the exact on-policy expectation of k used as a loss."""
    logp = token_logprobs(theta, source)
    ref_logp = torch.log_softmax(ref_logits, -1)
    loss = (torch.softmax(theta.detach(), -1) * kl_per_token(logp, ref_logp, estimator)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_k2_as_a_loss_has_the_gradient_of_reverse_kl(seed, source):
    theta, ref_logits = small_policy_and_ref(seed)
    _, _, grad_reverse, grad_forward = direct_kls(theta, ref_logits)
    grad = on_policy_loss_gradient(theta, ref_logits, "k2", source)
    torch.testing.assert_close(grad, grad_reverse, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grad, grad_forward, atol=1e-3)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_k3_as_a_loss_has_the_gradient_of_forward_kl(seed, source):
    theta, ref_logits = small_policy_and_ref(seed)
    _, _, grad_reverse, grad_forward = direct_kls(theta, ref_logits)
    grad = on_policy_loss_gradient(theta, ref_logits, "k3", source)
    torch.testing.assert_close(grad, grad_forward, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grad, grad_reverse, atol=1e-3)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_k1_as_a_loss_has_zero_gradient_in_expectation(seed, source):
    theta, ref_logits = small_policy_and_ref(seed)
    grad = on_policy_loss_gradient(theta, ref_logits, "k1", source)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_k1_in_the_reward_with_the_score_function_gradient_is_the_gradient_of_reverse_kl(seed, source):
    # REINFORCE: grad E_pi[k1] with k1 a constant reward = E_pi[k1 * grad log pi]
    theta, ref_logits = small_policy_and_ref(seed)
    _, _, grad_reverse, _ = direct_kls(theta, ref_logits)
    logp = token_logprobs(theta, source)
    k1 = kl_per_token(logp.detach(), torch.log_softmax(ref_logits, -1), "k1")
    surrogate = (torch.softmax(theta.detach(), -1) * k1 * logp).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(grad, grad_reverse, rtol=1e-9, atol=1e-12)


def test_k1_shaped_into_per_token_rewards_with_reward_to_go_gives_the_gradient_of_sequence_kl():
    """Two-token sequences from a tabular policy, enumerated exactly (V=3: 9 sequences).

    Rewards from shape_rewards (score 0, kl_coef 1) are -k1 per token; the
    REINFORCE gradient with reward-to-go of the expected return must equal
    -grad KL(pi||ref) over whole sequences, computed directly.
    """
    v = 3
    g = torch.Generator().manual_seed(7)
    theta1 = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_()  # pi(y1)
    theta2 = torch.randn(v, v, generator=g, dtype=torch.float64).requires_grad_()  # pi(y2 | y1)
    ref1 = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    ref2 = torch.log_softmax(torch.randn(v, v, generator=g, dtype=torch.float64), -1)

    y1, y2 = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
    y1, y2 = y1.reshape(-1), y2.reshape(-1)
    logp = torch.stack([torch.log_softmax(theta1, -1)[y1], torch.log_softmax(theta2, -1)[y1, y2]], dim=1)  # [9, 2]
    ref_logp = torch.stack([ref1[y1], ref2[y1, y2]], dim=1)
    seq_prob = logp.sum(1).exp().detach()

    # truth: sequence-level KL(pi||ref) = sum_y pi(y) log(pi(y)/ref(y)), differentiated directly
    kl_seq = (logp.sum(1).exp() * (logp.sum(1) - ref_logp.sum(1))).sum()
    truth = torch.autograd.grad(kl_seq, (theta1, theta2), retain_graph=True)

    shaped = shape_rewards(torch.zeros(9, dtype=torch.float64), logp.detach(), ref_logp, torch.ones(9, 2), kl_coef=1.0)
    reward_to_go = shaped.rewards.flip(1).cumsum(1).flip(1)
    surrogate = (seq_prob.unsqueeze(1) * reward_to_go * logp).sum()
    grads = torch.autograd.grad(surrogate, (theta1, theta2))
    for got, want in zip(grads, truth):
        torch.testing.assert_close(got, -want, rtol=1e-9, atol=1e-12)
