"""Reward shaping: the article's two functions and shape_rewards, on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from klbelt import ESTIMATORS, ShapedRewards, compute_kl_penalty, compute_rewards_with_kl, shape_rewards

NAN = float("nan")

# ----------------------------------------------------------------- the article's functions


def test_compute_rewards_with_kl_reproduces_the_articles_printed_example():
    rewards = torch.tensor([1.0, 0.5, -0.2, 0.8])
    policy_logprobs = torch.tensor([-2.0, -2.5, -3.0, -2.2])
    ref_logprobs = torch.tensor([-2.1, -2.3, -2.8, -2.5])
    total_rewards, kl = compute_rewards_with_kl(rewards, policy_logprobs, ref_logprobs)
    # the article prints these lists, formatted with :.2f
    assert [f"{r:.2f}" for r in rewards.tolist()] == ["1.00", "0.50", "-0.20", "0.80"]
    assert [f"{k:.2f}" for k in kl.tolist()] == ["0.10", "-0.20", "-0.20", "0.30"]
    assert [f"{r:.2f}" for r in total_rewards.tolist()] == ["0.99", "0.52", "-0.18", "0.77"]
    # and the unrounded values: kl = lp - ref, total = r - 0.1 * kl
    torch.testing.assert_close(kl, torch.tensor([0.1, -0.2, -0.2, 0.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(total_rewards, torch.tensor([0.99, 0.52, -0.18, 0.77]), rtol=0, atol=1e-6)


def test_compute_rewards_with_kl_scales_the_penalty_by_kl_coef():
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lp = torch.tensor([[-1.0, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    total, kl = compute_rewards_with_kl(rewards, lp, ref, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    torch.testing.assert_close(total, torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    total0, _ = compute_rewards_with_kl(rewards, lp, ref, kl_coef=0.0)
    torch.testing.assert_close(total0, rewards)


def test_compute_kl_penalty_is_kl_coef_times_the_mean_log_ratio():
    lp = torch.tensor([-1.0, -2.0, -0.5, -4.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.25, -4.0], dtype=torch.float64)
    # log-ratios 0.5, -1.0, -0.25, 0.0 -> mean -0.1875
    assert compute_kl_penalty(lp, ref).item() == pytest.approx(0.1 * -0.1875, rel=1e-14)  # default kl_coef 0.1
    assert compute_kl_penalty(lp, ref, kl_coef=2.0).item() == pytest.approx(-0.375, rel=1e-14)
    # the article's example batch has log-ratios summing to 0
    art = compute_kl_penalty(torch.tensor([-2.0, -2.5, -3.0, -2.2]), torch.tensor([-2.1, -2.3, -2.8, -2.5]))
    assert art.shape == () and art.item() == pytest.approx(0.0, abs=1e-7)


def test_compute_kl_penalty_means_over_every_element_of_a_batch():
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0], [-1.0, -1.0]])
    # log-ratios 1, 0, -1, -2 -> mean -0.5
    assert compute_kl_penalty(lp, ref, kl_coef=1.0).item() == pytest.approx(-0.5)


def test_compute_kl_penalty_is_differentiable_in_the_policy_logprobs():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    compute_kl_penalty(lp, torch.tensor([-1.0, -1.0]), kl_coef=0.1).backward()
    torch.testing.assert_close(lp.grad, torch.tensor([0.05, 0.05]))


# ----------------------------------------------------------------- shape_rewards


def hand_worked_batch():
    """Four rows of T=5 with padding positions holding NaN, +inf or positive garbage."""
    logprobs = torch.tensor(
        [
            [NAN, 5.0, -1.0, -2.0, -0.5],  # left padding: mask [0,0,1,1,1]
            [-0.2, -0.3, float("inf"), NAN, 0.0],  # early EOS: mask [1,1,0,0,0]
            [-1.0, -9.0, -2.0, NAN, -3.0],  # holes: mask [1,0,1,0,1]
            [NAN, NAN, 3.0, -1.0, -1.0],  # all masked
        ],
        dtype=torch.float64,
    )
    ref_logprobs = torch.tensor(
        [
            [NAN, 7.0, -1.5, -1.0, -0.5],
            [-0.1, -0.5, -1.0, 2.0, NAN],
            [-2.0, 0.5, -2.0, -9.0, -1.0],
            [-1.0, NAN, -1.0, 4.0, -1.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 0.5, 9.0], dtype=torch.float64)
    return scores, logprobs, ref_logprobs, mask


# log-ratios at the valid positions, by hand
LOG_RATIOS = {(0, 2): 0.5, (0, 3): -1.0, (0, 4): 0.0, (1, 0): -0.1, (1, 1): 0.2, (2, 0): 1.0, (2, 2): 0.0, (2, 4): -2.0}
LAST = [4, 1, 4, -1]


def test_shape_rewards_k1_matches_the_hand_worked_batch():
    scores, lp, ref, mask = hand_worked_batch()
    out = shape_rewards(scores, lp, ref, mask, kl_coef=0.1)
    assert isinstance(out, ShapedRewards)
    # -0.1 * k1 on valid tokens, + score on the last valid token, 0 elsewhere (score of the empty row dropped)
    expected_rewards = torch.tensor(
        [
            [0.0, 0.0, -0.05, 0.1, 0.0 + 2.0],
            [0.01, -0.02 - 1.0, 0.0, 0.0, 0.0],
            [-0.1, 0.0, 0.0, 0.0, 0.2 + 0.5],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    expected_kl = torch.tensor(
        [[0, 0, 0.5, -1.0, 0], [-0.1, 0.2, 0, 0, 0], [1.0, 0, 0, 0, -2.0], [0, 0, 0, 0, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(out.rewards, expected_rewards, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.kl, expected_kl, rtol=0, atol=1e-12)
    assert out.last_index.tolist() == LAST and out.last_index.dtype == torch.int64
    # 8 valid tokens summing to -1.4; three non-empty sequences with sums -0.5, 0.1, -1.0; largest 1.0
    assert out.kl_mean.item() == pytest.approx(-1.4 / 8, rel=1e-12)
    assert out.kl_seq_mean.item() == pytest.approx(-1.4 / 3, rel=1e-12)
    assert out.kl_max.item() == pytest.approx(1.0, rel=1e-12)
    for t in (out.rewards, out.kl, out.kl_mean, out.kl_seq_mean, out.kl_max):
        assert torch.isfinite(t).all()


def estimator_value(estimator: str, lr: float) -> float:
    return {"k1": lr, "k2": lr**2 / 2, "k3": math.exp(-lr) - 1 + lr, "abs": abs(lr)}[estimator]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shape_rewards_with_each_estimator_matches_its_formula_on_valid_tokens(estimator):
    scores, lp, ref, mask = hand_worked_batch()
    beta = 0.3
    out = shape_rewards(scores, lp, ref, mask, kl_coef=beta, estimator=estimator)
    kl = torch.zeros(4, 5, dtype=torch.float64)
    for (b, t), lr in LOG_RATIOS.items():
        kl[b, t] = estimator_value(estimator, lr)
    rewards = -beta * kl
    for b, t in enumerate(LAST):
        if t >= 0:
            rewards[b, t] += scores[b]
    torch.testing.assert_close(out.kl, kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rewards, rewards, rtol=1e-12, atol=1e-12)
    valid = [estimator_value(estimator, lr) for lr in LOG_RATIOS.values()]
    seq_sums = [sum(estimator_value(estimator, lr) for (b, _), lr in LOG_RATIOS.items() if b == row) for row in range(3)]
    assert out.kl_mean.item() == pytest.approx(sum(valid) / 8, rel=1e-12, abs=1e-15)
    assert out.kl_seq_mean.item() == pytest.approx(sum(seq_sums) / 3, rel=1e-12, abs=1e-15)
    assert out.kl_max.item() == pytest.approx(max(valid), rel=1e-12)


def test_shape_rewards_ignores_whatever_padding_positions_hold():
    scores, lp, ref, mask = hand_worked_batch()
    clean = shape_rewards(scores, lp.nan_to_num(0.0).clamp_max(0), ref.nan_to_num(0.0).clamp_max(0), mask, 0.1)
    for garbage in (NAN, 123.0, float("-inf")):
        fill = ~mask.bool()
        out = shape_rewards(scores, lp.masked_fill(fill, garbage), ref.masked_fill(fill, garbage), mask, 0.1)
        for name in ("rewards", "kl", "kl_mean", "kl_seq_mean", "kl_max"):
            torch.testing.assert_close(getattr(out, name), getattr(clean, name))


def test_bool_and_zero_one_masks_shape_identically():
    scores, lp, ref, mask = hand_worked_batch()
    a = shape_rewards(scores, lp, ref, mask.bool(), 0.1)
    b = shape_rewards(scores, lp, ref, mask.float(), 0.1)
    torch.testing.assert_close(a.rewards, b.rewards)
    assert a.last_index.tolist() == b.last_index.tolist() == LAST


def test_all_masked_batch_gives_zero_rewards_and_zero_statistics():
    out = shape_rewards(
        torch.tensor([1.0, 2.0]), torch.full((2, 3), NAN), torch.full((2, 3), NAN), torch.zeros(2, 3, dtype=torch.bool), 0.1
    )
    assert (out.rewards == 0).all() and (out.kl == 0).all()
    assert out.kl_mean.item() == 0.0 and out.kl_seq_mean.item() == 0.0 and out.kl_max.item() == 0.0
    assert out.last_index.tolist() == [-1, -1]


def test_kl_max_can_be_negative_for_k1():
    # every valid k1 is negative: the max is the least negative valid value, not a masked 0
    lp = torch.tensor([[-2.0, -3.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.5, -5.0]])
    out = shape_rewards(torch.tensor([0.0]), lp, ref, torch.tensor([[1, 1, 0]]), 0.1)
    assert out.kl_max.item() == pytest.approx(-1.0)


def test_shape_rewards_returns_detached_tensors_and_accepts_a_tensor_kl_coef():
    scores, lp, ref, mask = hand_worked_batch()
    lp = lp.clone().requires_grad_()
    beta = torch.tensor(0.1, requires_grad=True)
    out = shape_rewards(scores, lp, ref, mask, beta)
    for t in (out.rewards, out.kl, out.kl_mean, out.kl_seq_mean, out.kl_max):
        assert not t.requires_grad
    torch.testing.assert_close(out.rewards, shape_rewards(scores, lp.detach(), ref, mask, 0.1).rewards)


def test_zero_kl_coef_leaves_only_the_score():
    scores, lp, ref, mask = hand_worked_batch()
    out = shape_rewards(scores, lp, ref, mask, 0.0)
    assert out.rewards.sum().item() == pytest.approx(2.0 - 1.0 + 0.5)
    assert out.kl_mean.item() == pytest.approx(-1.4 / 8)  # the KL is still measured


def test_float32_inputs_give_float32_rewards():
    scores, lp, ref, mask = hand_worked_batch()
    out = shape_rewards(scores.float(), lp.float(), ref.float(), mask, 0.1)
    assert out.rewards.dtype == torch.float32 and out.kl.dtype == torch.float32


def test_zero_length_responses_are_legal_and_give_empty_rewards():
    # T = 0: every row is all-masked; nothing to shape, nothing to score
    out = shape_rewards(torch.tensor([1.0, 2.0]), torch.empty(2, 0), torch.empty(2, 0), torch.empty(2, 0), 0.1)
    assert out.rewards.shape == (2, 0) and out.last_index.tolist() == [-1, -1]
    assert out.kl_mean.item() == 0.0 and out.kl_seq_mean.item() == 0.0 and out.kl_max.item() == 0.0


def test_an_empty_batch_is_legal():
    out = shape_rewards(torch.empty(0), torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 3), 0.1)
    assert out.rewards.shape == (0, 3) and out.kl_mean.item() == 0.0
