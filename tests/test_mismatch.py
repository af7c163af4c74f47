"""Sampler/trainer mismatch: mismatch_stats, importance_weights and the weights= correction.

Every claim is checked by exact enumeration over a small vocabulary: an
expectation under the sampler mu is a sum over all tokens (or all 2-token
sequences) weighted by mu's probabilities.
"""

import itertools
import math

import pytest
import torch

from klbelt import aggregate, importance_weights, kl_per_token, mismatch_stats

V = 5


def dists(seed=0):
    g = torch.Generator().manual_seed(seed)
    pi, mu, ref = (torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.2, -1) for _ in range(3))
    return pi, mu, ref


def kl(p, q):
    return float((p.exp() * (p - q)).sum())


def enum_tokens(pi, mu, ref):
    """Every token y as a row [V, 1] of log-probs, and mu(y) as the enumeration weight."""
    col = lambda x: x.reshape(V, 1)
    return col(pi), col(mu), col(ref), mu.exp()


def e_mu(values, p_mu):
    return float((values.reshape(-1) * p_mu).sum())


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_untruncated_weights_make_k1_k3_unbiased_for_kl_pi_ref_under_mu(estimator):
    pi, mu, ref = dists(1)
    lp, lmu, lref, p_mu = enum_tokens(pi, mu, ref)
    ones = torch.ones_like(lp)
    w, clipped = importance_weights(lp, lmu, ones, cap=1e6)
    assert float(clipped) == 0
    corrected = e_mu(kl_per_token(lp, lref, estimator, weights=w), p_mu)
    assert corrected == pytest.approx(kl(pi, ref), abs=1e-12)
    # the same through aggregate(weights=): a mean over mu-drawn tokens, exact in expectation
    per_token = kl_per_token(lp, lref, estimator)
    via_aggregate = sum(float(aggregate(per_token[y : y + 1], ones[y : y + 1], weights=w[y : y + 1])) * float(p_mu[y]) for y in range(V))
    assert via_aggregate == pytest.approx(kl(pi, ref), abs=1e-12)


def test_uncorrected_k1_k3_are_biased_by_the_stated_amount():
    pi, mu, ref = dists(2)
    lp, lmu, lref, p_mu = enum_tokens(pi, mu, ref)
    k1 = e_mu(kl_per_token(lp, lref, "k1"), p_mu)
    k3 = e_mu(kl_per_token(lp, lref, "k3"), p_mu)
    # E_mu[k1] = KL(mu||ref) - KL(mu||pi); E_mu[k3] = E_mu[ref/pi] - 1 + E_mu[k1]
    assert k1 == pytest.approx(kl(mu, ref) - kl(mu, pi), abs=1e-12)
    assert k3 == pytest.approx(float((mu.exp() * (ref - pi).exp()).sum()) - 1 + k1, abs=1e-12)
    assert abs(k1 - kl(pi, ref)) > 1e-3  # the bias is real for these distributions


@pytest.mark.parametrize("cap", [1.2, 2.0, 5.0])
def test_truncation_bias_is_bounded_as_documented(cap):
    pi, mu, ref = dists(3)
    lp, lmu, lref, p_mu = enum_tokens(pi, mu, ref)
    w, _ = importance_weights(lp, lmu, torch.ones_like(lp), cap=cap)
    assert float(w.max()) <= cap + 1e-12
    f = kl_per_token(lp, lref, "k1")
    bias = e_mu(w * f, p_mu) - kl(pi, ref)
    exact_bias = -e_mu((torch.exp(lp - lmu) - cap).clamp_min(0) * f, p_mu)
    bound = float(f.abs().max()) * float((pi.exp() - cap * mu.exp()).clamp_min(0).sum())
    assert bias == pytest.approx(exact_bias, abs=1e-12)
    assert abs(bias) <= bound + 1e-12


def seq_enum(seed=4):
    """All 2-token sequences of an autoregressive pi, mu, ref: log-probs [V*V, 2] and mu(seq)."""
    g = torch.Generator().manual_seed(seed)
    tables = [torch.log_softmax(torch.randn(V + 1, V, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    rows = list(itertools.product(range(V), repeat=2))
    lps = [torch.tensor([[t[0, a], t[1 + a, b]] for a, b in rows], dtype=torch.float64) for t in tables]
    return lps, lps[1].sum(-1).exp()


def test_untruncated_sequence_weight_gives_unbiased_sequence_kl_and_geometric_is_length_free():
    (lp, lmu, lref), p_mu = seq_enum()
    mask = torch.ones_like(lp)
    w, _ = importance_weights(lp, lmu, mask, level="sequence", cap=1e9)
    assert torch.equal(w[:, 0], w[:, 1])  # one weight per sequence, repeated on its tokens
    kl_seq = float((lp.sum(-1).exp() * (lp - lref).sum(-1)).sum())
    got = float((p_mu * (w * kl_per_token(lp, lref, "k1")).sum(-1)).sum())
    assert got == pytest.approx(kl_seq, abs=1e-10)
    wg, _ = importance_weights(lp, lmu, mask, level="geometric", cap=1e9)
    assert torch.allclose(wg[:, 0], ((lp - lmu).mean(-1)).exp())


def test_policy_gradient_with_tis_equals_on_policy_gradient_when_mu_is_pi():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    advantage = torch.randn(V, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    on_policy = torch.autograd.grad((lp.exp() * advantage).sum(), logits, retain_graph=True)[0]  # grad of E_pi[A]
    mu = lp.detach()  # the sampler is the policy
    w, clipped = importance_weights(lp.reshape(V, 1), mu.reshape(V, 1), torch.ones(V, 1), cap=2.0)
    assert float(clipped) == 0 and torch.equal(w, torch.ones_like(w))
    surrogate = (mu.exp() * w.reshape(-1) * lp * advantage).sum()  # E_mu[w * log pi * A]
    assert torch.allclose(torch.autograd.grad(surrogate, logits, retain_graph=True)[0], on_policy, atol=1e-12)
    # and with mu != pi, untruncated token weights still give the on-policy gradient
    mu2 = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    w2, _ = importance_weights(lp.detach().reshape(V, 1), mu2.reshape(V, 1), torch.ones(V, 1), cap=1e9)
    surrogate2 = (mu2.exp() * w2.reshape(-1) * lp * advantage).sum()
    assert torch.allclose(torch.autograd.grad(surrogate2, logits)[0], on_policy, atol=1e-12)


def test_mask_mode_zeroes_weights_outside_the_band_and_truncate_caps():
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.3, 0.1]]))
    lmu = torch.log(torch.tensor([[0.1, 0.2, 0.9, 0.1]]))  # ratios 5, 1, 1/3, 1
    mask = torch.tensor([[1, 1, 1, 0]])
    w, frac = importance_weights(lp, lmu, mask, mode="mask", band=(0.5, 2.0))
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]])) and float(frac) == pytest.approx(2 / 3)
    w, frac = importance_weights(lp, lmu, mask, mode="truncate", cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 1 / 3, 0.0]])) and float(frac) == pytest.approx(1 / 3)
    w, frac = importance_weights(lp, lmu, mask, mode="mask", cap=3.0)  # no band: (0, cap]
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 1 / 3, 0.0]])) and float(frac) == pytest.approx(1 / 3)


def test_sequence_weight_never_overflows():
    lp = torch.zeros(1, 200)
    lmu = torch.full((1, 200), -5.0)  # sequence ratio e^1000
    w, frac = importance_weights(lp, lmu, torch.ones(1, 200), level="sequence", cap=2.0)
    assert torch.equal(w, torch.full_like(w, 2.0)) and float(frac) == 1.0


def test_mismatch_stats_match_closed_forms_by_enumeration():
    pi, mu, _ = dists(6)
    lp, lmu, _, p_mu = enum_tokens(pi, mu, pi)
    ones = torch.ones_like(lp)
    # the stats of a batch holding each token once, weighted by mu, are the exact expectations:
    # evaluate per token and take E_mu
    per = [mismatch_stats(lp[y : y + 1], lmu[y : y + 1], ones[y : y + 1]) for y in range(V)]
    expect = lambda key: sum(float(s[key]) * float(p_mu[y]) for y, s in enumerate(per))
    assert expect("k1") == pytest.approx(kl(mu, pi), abs=1e-12)
    assert expect("k3") == pytest.approx(kl(mu, pi), abs=1e-12)
    assert expect("chi2") == pytest.approx(float((pi.exp() ** 2 / mu.exp()).sum()) - 1, abs=1e-12)


def test_mismatch_stats_units_and_tails_on_a_masked_batch():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    lmu = torch.tensor([[-1.5, -2.0, -0.1], [-1.0, -4.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = mismatch_stats(lp, lmu, mask)
    d = (lp - lmu)  # valid: .5 0 -.4 | 0 3
    assert float(s["k1"]) == pytest.approx(-(0.5 + 0 - 0.4 + 0 + 3.0) / 5)
    assert float(s["k1_seq"]) == pytest.approx(-((0.5 - 0.4) + 3.0) / 2)
    assert float(s["log_ppl_ratio"]) == pytest.approx(-((0.1 / 3) + 1.5) / 2)
    assert float(s["max_abs_log_ratio"]) == pytest.approx(3.0)
    assert float(s["k3"]) == pytest.approx(float(((d.exp() - 1 - d) * mask).sum()) / 5, rel=1e-6)
    assert float(s["frac_outside_band"]) == pytest.approx(1 / 5)  # only e^3 is outside (0.5, 2)
    assert float(mismatch_stats(lp, lp, mask)["k3"]) == 0.0


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda a, b, m: mismatch_stats(a, b[:, :2], m), ValueError, "sampler_logprobs"),
        (lambda a, b, m: mismatch_stats(a, b, m[:, :2]), ValueError, "mask"),
        (lambda a, b, m: mismatch_stats(a, b.abs(), m), ValueError, "sampler_logprobs"),
        (lambda a, b, m: mismatch_stats(a.clone().fill_(math.nan), b, m), ValueError, "trainer_logprobs"),
        (lambda a, b, m: importance_weights(a, b, m, cap=1.0), ValueError, "cap"),
        (lambda a, b, m: importance_weights(a, b, m, band=(1.5, 3.0)), ValueError, "band"),
        (lambda a, b, m: importance_weights(a, b, m, band=(0.2, 0.9)), ValueError, "band"),
        (lambda a, b, m: importance_weights(a, b, m, level="seq"), ValueError, "level"),
        (lambda a, b, m: importance_weights(a.long(), b, m), TypeError, "trainer_logprobs"),
        (lambda a, b, m: kl_per_token(a, b, weights=-torch.ones_like(a)), ValueError, "weights"),
        (lambda a, b, m: aggregate(a, m, weights=torch.ones(3)), ValueError, "weights"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    a, b, m = -torch.rand(2, 3) - 0.1, -torch.rand(2, 3) - 0.1, torch.ones(2, 3)
    with pytest.raises(exc, match=words):
        call(a, b, m)


def test_masked_positions_may_hold_anything():
    lp = torch.tensor([[-1.0, 5.0]])
    lmu = torch.tensor([[-1.2, float("nan")]])
    s = mismatch_stats(lp, lmu, torch.tensor([[1, 0]]))
    assert float(s["k1"]) == pytest.approx(-0.2)
    w, _ = importance_weights(lp, lmu, torch.tensor([[1, 0]]))
    assert float(w[0, 1]) == 0.0
