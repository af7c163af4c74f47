"""Numerical safety: extreme log-ratios, the optional log-ratio clamp, and bf16/fp16 policies.

Independent truths used here:

* the estimators' closed forms and their derivatives in the log-ratio l
  (k1 = l, k2 = l^2/2, k3 = e^{-l} - 1 + l, abs = |l|; derivatives 1, l,
  1 - e^{-l}, sign(l)), evaluated in float64 by hand;
* for low-precision logits, a float64 log-softmax of the *same* bf16/fp16
  values (every bf16/fp16 number is exact in fp32 and fp64, so klbelt and the
  reference read identical inputs and differ only by klbelt's fp32 rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

from klbelt import ESTIMATORS, kl_from_logits, kl_per_token, logprobs_from_logits, shape_rewards

EPS32 = torch.finfo(torch.float32).eps

# log-ratios reaching +/-50, a few inside [-1, 1], and exactly +/-1 (the clamp boundary used below)
LOG_RATIOS = [-50.0, -7.0, -1.0, -0.5, -0.125, 0.0, 0.25, 1.0, 3.0, 50.0]


def closed_form(estimator: str, lr: torch.Tensor) -> torch.Tensor:
    """The estimator's value, in float64, written independently of klbelt."""
    lr = lr.double()
    return {
        "k1": lambda: lr,
        "k2": lambda: lr**2 / 2,
        "k3": lambda: torch.exp(-lr) - 1 + lr,
        "abs": lambda: lr.abs(),
    }[estimator]()


def closed_form_derivative(estimator: str, lr: torch.Tensor) -> torch.Tensor:
    """d estimator / d l, in float64: k1: 1, k2: l, k3: 1 - e^{-l}, abs: sign(l)."""
    lr = lr.double()
    return {
        "k1": lambda: torch.ones_like(lr),
        "k2": lambda: lr,
        "k3": lambda: 1 - torch.exp(-lr),
        "abs": lambda: torch.sign(lr),
    }[estimator]()


def logprob_pair(log_ratios, dtype=torch.float32):
    """(logprobs, ref_logprobs), both valid (<= 0) leaf tensors with logprobs - ref_logprobs = log_ratios exactly.

    The larger of the two is -0.5, the other -0.5 - |l|: every difference is exact in fp32.
    """
    lr = torch.tensor(log_ratios, dtype=torch.float64)
    logp = torch.where(lr >= 0, torch.full_like(lr, -0.5), -0.5 + lr)
    ref = logp - lr
    return logp.to(dtype).requires_grad_(True), ref.to(dtype).requires_grad_(True), lr


def value_and_grads(estimator, logp, ref, **clamp):
    out = kl_per_token(logp, ref, estimator, **clamp)
    g_logp, g_ref = torch.autograd.grad(out.sum(), (logp, ref))
    return out.detach(), g_logp, g_ref


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), (a, b)


# ----------------------------------------------------------------- default: unchanged


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_no_clamp_is_bitwise_identical_to_the_unclamped_formulas(estimator):
    logp = -torch.rand(64, generator=torch.Generator().manual_seed(0)) * 6
    ref = -torch.rand(64, generator=torch.Generator().manual_seed(1)) * 6
    lr = logp - ref
    formula = {"k1": lr, "k2": 0.5 * lr.square(), "k3": torch.expm1(-lr) + lr, "abs": lr.abs()}[estimator]
    for kwargs in ({}, {"log_ratio_clamp": None}, {"log_ratio_clamp": None, "clamp_gradient": "pass"}):
        assert_bitwise_equal(kl_per_token(logp, ref, estimator, **kwargs), formula)
    # and the gradients: autograd through the same formula
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    lr_ab = a - b
    f = {"k1": lambda: lr_ab, "k2": lambda: 0.5 * lr_ab.square(), "k3": lambda: torch.expm1(-lr_ab) + lr_ab, "abs": lambda: lr_ab.abs()}
    expected = torch.autograd.grad(f[estimator]().sum(), (a, b))
    got = value_and_grads(estimator, logp.clone().requires_grad_(True), ref.clone().requires_grad_(True))[1:]
    for e, g in zip(expected, got):
        assert_bitwise_equal(g, e)


@pytest.mark.parametrize("mode", ["zero", "pass"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_clamp_wider_than_every_log_ratio_changes_neither_values_nor_gradients(estimator, mode):
    logp, ref, _ = logprob_pair(LOG_RATIOS)
    plain = value_and_grads(estimator, logp, ref)
    wide = value_and_grads(estimator, logp, ref, log_ratio_clamp=51.0, clamp_gradient=mode)
    for p, w in zip(plain, wide):
        assert_bitwise_equal(w, p)


def test_shape_rewards_without_a_clamp_is_bitwise_unchanged():
    logp, ref, _ = logprob_pair(LOG_RATIOS)
    logp, ref = logp.detach().reshape(2, 5), ref.detach().reshape(2, 5)
    mask, scores = torch.ones(2, 5), torch.tensor([1.0, -2.0])
    old = shape_rewards(scores, logp, ref, mask, 0.1, "k1")
    new = shape_rewards(scores, logp, ref, mask, 0.1, "k1", log_ratio_clamp=None, clamp_gradient="pass")
    for field in ("rewards", "kl", "kl_mean", "kl_seq_mean", "kl_max", "last_index"):
        assert_bitwise_equal(getattr(new, field), getattr(old, field))


# ----------------------------------------------------------------- extreme log-ratios, no clamp


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_log_ratios_of_plus_minus_50_give_finite_fp32_values_and_gradients_for_every_estimator(estimator):
    logp, ref, lr = logprob_pair(LOG_RATIOS)
    value, g_logp, g_ref = value_and_grads(estimator, logp, ref)
    for t in (value, g_logp, g_ref):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()), t
    # and right, not just finite: k3(-50) = e^50 - 51 ~ 5.2e21 is within fp32's range (3.4e38)
    torch.testing.assert_close(value.double(), closed_form(estimator, lr), rtol=4 * EPS32, atol=4 * EPS32)
    torch.testing.assert_close(g_logp.double(), closed_form_derivative(estimator, lr), rtol=4 * EPS32, atol=0.0)
    assert_bitwise_equal(g_ref, -g_logp)


def test_k3_overflows_fp32_below_a_log_ratio_of_minus_88_and_a_clamp_keeps_it_finite():
    # exp(-l) exceeds fp32's largest number (~3.4e38 = e^88.72) for l < -88.72: the value is +inf
    # and the gradient 1 - e^{-l} is -inf. Without a clamp klbelt returns them as they are.
    logp, ref, _ = logprob_pair([-88.0, -89.0, -100.0])
    value, g_logp, _ = value_and_grads("k3", logp, ref)
    assert math.isfinite(value[0]) and math.isfinite(g_logp[0])
    assert value[1:].tolist() == [math.inf, math.inf] and g_logp[1:].tolist() == [-math.inf, -math.inf]
    for mode in ("zero", "pass"):
        value, g_logp, g_ref = value_and_grads("k3", logp, ref, log_ratio_clamp=20.0, clamp_gradient=mode)
        assert bool(torch.isfinite(value).all() and torch.isfinite(g_logp).all() and torch.isfinite(g_ref).all())
        torch.testing.assert_close(value.double(), closed_form("k3", torch.full((3,), -20.0)), rtol=4 * EPS32, atol=0.0)


def test_k3_of_fp16_log_probs_overflows_below_minus_11_so_the_estimators_want_fp32_inputs():
    # kl_per_token computes in its inputs' dtype: in fp16, exp(-l) passes 65504 = e^11.09 at l < -11.09.
    logp, ref, _ = logprob_pair([-11.0, -12.0], dtype=torch.float16)
    value = kl_per_token(logp, ref, "k3").detach()
    assert math.isfinite(value[0]) and value[1].item() == math.inf
    fp32 = kl_per_token(logp.detach().float(), ref.detach().float(), "k3")
    assert bool(torch.isfinite(fp32).all())


# ----------------------------------------------------------------- the clamp


@pytest.mark.parametrize("mode", ["zero", "pass"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_clamped_values_are_the_estimator_at_the_clamped_log_ratio(estimator, mode):
    c = 1.0
    logp, ref, lr = logprob_pair(LOG_RATIOS)
    value = kl_per_token(logp, ref, estimator, log_ratio_clamp=c, clamp_gradient=mode).detach()
    clamped = torch.tensor([min(max(x, -c), c) for x in lr.tolist()], dtype=torch.float64)
    torch.testing.assert_close(value.double(), closed_form(estimator, clamped), rtol=4 * EPS32, atol=4 * EPS32)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_zero_clamp_gradient_is_exactly_zero_on_the_tokens_beyond_the_clamp_and_the_closed_form_elsewhere(estimator):
    c = 1.0
    logp, ref, lr = logprob_pair(LOG_RATIOS)
    _, g_logp, g_ref = value_and_grads(estimator, logp, ref, log_ratio_clamp=c, clamp_gradient="zero")
    beyond = lr.abs() > c  # the boundary |l| = c is inside: torch.clamp passes the gradient there
    assert beyond.any() and (~beyond).any() and (lr.abs() == c).any()
    assert bool((g_logp[beyond] == 0).all()) and bool((g_ref[beyond] == 0).all())
    inside = ~beyond
    expected = closed_form_derivative(estimator, lr)[inside]
    torch.testing.assert_close(g_logp[inside].double(), expected, rtol=4 * EPS32, atol=0.0)
    torch.testing.assert_close(g_ref[inside].double(), -expected, rtol=4 * EPS32, atol=0.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_pass_clamp_gradient_is_the_estimators_derivative_at_the_clamped_log_ratio_and_nonzero_on_drifted_tokens(estimator):
    c = 1.0
    logp, ref, lr = logprob_pair(LOG_RATIOS)
    _, g_logp, g_ref = value_and_grads(estimator, logp, ref, log_ratio_clamp=c, clamp_gradient="pass")
    clamped = lr.clamp(-c, c)
    expected = closed_form_derivative(estimator, clamped)  # f'(clamp(l)) * dl/dlogp, dl/dlogp = 1
    torch.testing.assert_close(g_logp.double(), expected, rtol=4 * EPS32, atol=0.0)
    torch.testing.assert_close(g_ref.double(), -expected, rtol=4 * EPS32, atol=0.0)
    beyond = lr.abs() > c
    assert bool((g_logp[beyond] != 0).all()) and bool(torch.isfinite(g_logp).all())
    # drifted tokens are pulled back in the direction of their own sign (k1 always pushes logp down)
    if estimator != "k1":
        assert torch.equal(torch.sign(g_logp[beyond]), torch.sign(lr[beyond]).float())


def test_zero_and_pass_clamps_differ_only_on_tokens_beyond_the_clamp():
    logp, ref, lr = logprob_pair(LOG_RATIOS)
    zero = value_and_grads("k3", logp, ref, log_ratio_clamp=1.0, clamp_gradient="zero")
    passed = value_and_grads("k3", logp, ref, log_ratio_clamp=1.0, clamp_gradient="pass")
    assert_bitwise_equal(zero[0], passed[0])
    inside = lr.abs() <= 1.0
    assert_bitwise_equal(zero[1][inside], passed[1][inside])
    assert bool((zero[1][~inside] != passed[1][~inside]).all())


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"log_ratio_clamp": 0.0}, ValueError, "log_ratio_clamp"),
        ({"log_ratio_clamp": -1.0}, ValueError, "log_ratio_clamp"),
        ({"log_ratio_clamp": float("nan")}, ValueError, "log_ratio_clamp"),
        ({"log_ratio_clamp": float("inf")}, ValueError, "log_ratio_clamp"),
        ({"log_ratio_clamp": "1"}, TypeError, "log_ratio_clamp"),
        ({"log_ratio_clamp": True}, TypeError, "log_ratio_clamp"),
        ({"log_ratio_clamp": 1.0, "clamp_gradient": "none"}, ValueError, "clamp_gradient"),
        ({"clamp_gradient": "straight-through"}, ValueError, "clamp_gradient"),
    ],
)
def test_bad_clamp_arguments_raise_an_error_naming_the_argument(kwargs, exc, words):
    logp, ref = torch.full((2, 3), -1.0), torch.full((2, 3), -2.0)
    with pytest.raises(exc, match=words):
        kl_per_token(logp, ref, "k1", **kwargs)
    with pytest.raises(exc, match=words):
        shape_rewards(torch.zeros(2), logp, ref, torch.ones(2, 3), 0.1, "k1", **kwargs)


def test_the_clamp_arguments_are_keyword_only():
    logp, ref = torch.full((3,), -1.0), torch.full((3,), -2.0)
    with pytest.raises(TypeError):
        kl_per_token(logp, ref, "k1", 1.0)  # type: ignore[misc]


def test_shape_rewards_clamps_the_k1_penalty_on_hand_worked_numbers():
    # l = [3, -0.5, -4 | 0.25, 2, (masked)] clamped to [-1, 1]: [1, -0.5, -1 | 0.25, 1, 0]
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.75, -1.0, -9.0]])
    ref = torch.tensor([[-4.0, -1.5, -1.0], [-1.0, -3.0, -0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([10.0, 20.0])
    out = shape_rewards(scores, logp, ref, mask, 0.5, "k1", log_ratio_clamp=1.0)
    torch.testing.assert_close(out.kl, torch.tensor([[1.0, -0.5, -1.0], [0.25, 1.0, 0.0]]), rtol=0, atol=0)
    # rewards = -0.5 * kl, plus the score on each row's last valid token
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.5, 0.25, 0.5 + 10.0], [-0.125, -0.5 + 20.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(out.kl_mean, torch.tensor((1.0 - 0.5 - 1.0 + 0.25 + 1.0) / 5), rtol=0, atol=1e-7)
    assert float(out.kl_max) == 1.0
    unclamped = shape_rewards(scores, logp, ref, mask, 0.5, "k1")
    assert float(unclamped.kl_max) == 3.0


# ----------------------------------------------------------------- low-precision logits


def huge_gap_logits(dtype, gap: float, rows: int = 6, vocab: int = 1000, seed: int = 0):
    """Logits whose winner sits +gap above the rest, at an index the kernels' strided shift sample misses.

    Row r's winner is at index 7 + r (the one-pass kernel samples every 15th entry of a
    1000-entry row, so its shift lies ~gap below the maximum and the sum overflows): those
    rows go through the exact two-pass recomputation.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 3
    z[torch.arange(rows), 7 + torch.arange(rows)] = gap
    z[:, 500] = -gap
    return z.to(dtype)


def float64_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype,gap", [(torch.bfloat16, 1e4), (torch.bfloat16, 1e6), (torch.float16, 6e4)])
def test_low_precision_logits_with_huge_gaps_give_finite_fp32_logprobs_and_kl_that_match_float64(dtype, gap):
    logits = huge_gap_logits(dtype, gap)
    ref_logits = huge_gap_logits(dtype, gap, seed=1).flip(-1)  # the reference's winner is elsewhere
    tokens = torch.tensor([7, 8, 500, 0, 999, 11])  # the winner, a loser at -gap, ordinary losers
    x = logits.clone().requires_grad_(True)
    lp = logprobs_from_logits(x, tokens)
    assert lp.dtype == torch.float32 and bool(torch.isfinite(lp).all())
    # Same inputs (bf16/fp16 values are exact in fp32), so the only error is fp32 rounding of
    # (z_t - c) - log_s: a couple of roundings relative to |log p| (up to 2 * gap here).
    torch.testing.assert_close(lp.double(), float64_logprobs(logits, tokens), rtol=4 * EPS32, atol=4 * EPS32)
    (grad,) = torch.autograd.grad(lp.sum(), x)
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
    for direction in ("reverse", "forward"):
        a, b = logits.clone().requires_grad_(True), ref_logits.clone().requires_grad_(True)
        kl = kl_from_logits(a, b, direction=direction)
        assert kl.dtype == torch.float32 and bool(torch.isfinite(kl).all())
        p64, q64 = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref_logits.double(), -1)
        if direction == "forward":
            p64, q64 = q64, p64
        expected = (p64.exp() * (p64 - q64)).sum(-1)  # ~ gap nats: the winners disagree
        assert bool((expected > 0.99 * gap).all())
        torch.testing.assert_close(kl.double(), expected, rtol=16 * EPS32, atol=16 * EPS32)
        ga, gb = torch.autograd.grad(kl.sum(), (a, b))
        assert bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())


# ----------------------------------------------------------------- bf16 / fp16 policies

LOW_PRECISION = [torch.bfloat16, torch.float16]
WORDS = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def tok():
    from tiny_models import word_tokenizer

    return word_tokenizer(WORDS)


def low_precision_policy(tok, dtype):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=7)
    with torch.no_grad():  # larger logits than the default init, so the distributions are not ~uniform
        model.lm_head.weight.mul_(4.0)  # (tied to the input embeddings)
    return model.to(dtype)


def logprob_tolerance(logits: torch.Tensor) -> float:
    """fp32 log-softmax of exact inputs vs float64: a few fp32 roundings of numbers of size
    max|z| + log V, plus one per term of the V-term sum: (V + 8) * eps32 * (max|z| + log V)."""
    v = logits.shape[-1]
    return (v + 8) * EPS32 * (float(logits.double().abs().max()) + math.log(v))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_sampling_from_a_low_precision_policy_records_fp32_logprobs_of_the_logits_it_sampled_from(tok, dtype):
    from klbelt.rl.rollout import sample

    model = low_precision_policy(tok, dtype)
    seen = []  # the policy's own bf16/fp16 logits at the last position of every forward
    handle = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].detach().clone()))
    enc = tok(["a", "b c d", "e f"], return_tensors="pt", padding=True)
    try:
        roll = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=5, pad_token_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert roll.logprobs.dtype == torch.float32 and bool(torch.isfinite(roll.logprobs).all())
    R = roll.responses.shape[1]
    assert seen[0].dtype == dtype and len(seen) == R
    logits = torch.stack(seen[:R], dim=1)  # [B, R, V], the logits each token was sampled from
    expected = float64_logprobs(logits, roll.responses)
    torch.testing.assert_close(roll.logprobs.double(), expected, rtol=0, atol=logprob_tolerance(logits))
    assert float(expected.min()) < -1.0  # the check is not on near-zero log-probs alone


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_response_logprobs_of_a_low_precision_policy_are_fp32_and_match_float64_of_the_same_logits(tok, dtype):
    from klbelt.rl.rollout import response_logits, response_logprobs, sample

    model = low_precision_policy(tok, dtype)
    enc = tok(["a", "b c d", "e f"], return_tensors="pt", padding=True)
    roll = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=5, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = response_logprobs(model, roll)
        logits = response_logits(model, roll)
    assert logits.dtype == dtype
    assert lp.dtype == torch.float32 and bool(torch.isfinite(lp).all())
    expected = float64_logprobs(logits, roll.responses) * roll.response_mask.double()
    torch.testing.assert_close(lp.double(), expected, rtol=0, atol=logprob_tolerance(logits))


def _train_two_steps(tmp_path, tok, dtype, advantage):
    from klbelt.rl.config import TrainConfig
    from klbelt.rl.trainer import train

    def reward_fn(texts):
        return torch.tensor([float(t.count("a")) - 0.5 * len(t.split()) for t in texts])

    cfg = TrainConfig(
        steps=2, batch_size=4, max_new_tokens=4, group_size=2 if advantage == "group" else 1, advantage=advantage,
        controller="adaptive", checkpoint_every=1000, out=str(tmp_path),
    )
    history = train(cfg, low_precision_policy(tok, dtype), tok, ["a", "b c", "d e f", "f"], reward_fn, warn_alerts=False)
    assert len(history) == 2
    for record in history:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    return history


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["group", "gae"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_training_a_low_precision_policy_gives_finite_metrics_and_moves_its_weights(tmp_path, tok, dtype, advantage):
    # AdamW stepping fp16 weights in place turns eps=1e-8 into 0 and zero-gradient weights into NaN,
    # and bf16 drops updates below ~0.4% of a weight: the trainer steps fp32 master weights instead.
    from klbelt.rl.config import TrainConfig
    from klbelt.rl.trainer import train

    def reward_fn(texts):
        return torch.tensor([float(t.count("a")) - 0.5 * len(t.split()) for t in texts])

    policy = low_precision_policy(tok, dtype)
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = TrainConfig(
        steps=3, batch_size=4, max_new_tokens=4, group_size=2 if advantage == "group" else 1, advantage=advantage,
        controller="adaptive", lr=1e-4, checkpoint_every=2, out=str(tmp_path),
    )
    history = train(cfg, policy, tok, ["a", "b c", "d e f", "f"], reward_fn, warn_alerts=False)
    assert len(history) == 3
    for record in history:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in policy.parameters())
    # lr 1e-4 moves a weight by ~1e-4 per step: below bf16's resolution for most weights, so only
    # accumulated fp32 master weights make them move at all
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(policy.parameters(), before))
    assert moved > 0.5 * sum(b.numel() for b in before)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(m.dtype == torch.float32 for m in state["policy_master"])


@pytest.mark.parametrize("kl_in,estimator", [("reward", "k1"), ("loss", "k3")])
def test_trainer_clamp_changes_the_objective_but_the_logged_and_controlled_kl_stays_the_true_one(tmp_path, tok, kl_in, estimator):
    from klbelt.rl.config import TrainConfig
    from klbelt.rl.trainer import train
    from tiny_models import tiny_gpt2

    def reward_fn(texts):
        return torch.zeros(len(texts))

    def run(name, **clamp):
        cfg = TrainConfig(steps=1, batch_size=8, max_new_tokens=4, kl_in=kl_in, kl_estimator=estimator, kl_coef=1.0,
                          controller="pid", checkpoint_every=1000, whiten_advantages=False, out=str(tmp_path / name), **clamp)
        policy, ref = tiny_gpt2(len(tok), seed=0), tiny_gpt2(len(tok), seed=7)  # far apart: large log-ratios
        record = train(cfg, policy, tok, ["a", "b c"], reward_fn, ref_policy=ref, warn_alerts=False)[0]
        return record, torch.cat([p.detach().reshape(-1) for p in policy.parameters()])

    (free, free_w), (clamped, clamped_w) = run("free"), run("clamped", log_ratio_clamp=0.05)
    assert free["kl_max"] > 0.05  # the clamp bites on some tokens
    for key in ("kl", "kl_max", "kl_seq", "next_kl_coef"):
        assert clamped[key] == free[key], key  # true KL: same samples, same metrics, same beta update
    assert not torch.equal(clamped_w, free_w)  # but the penalty the policy optimises is the clamped one
