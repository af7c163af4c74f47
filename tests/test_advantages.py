"""GAE, group baselines and PPO losses against hand-worked numbers and their definitions."""

import pytest
import torch

from klbelt.rl import gae, group_advantages, ppo_policy_loss, ppo_value_loss


def _discounted_definition(rewards, values, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} on one fully valid row, V after the end = 0."""
    T = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(T)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(T - t)) for t in range(T)]


def test_gae_matches_hand_worked_example():
    # r = [0, 0, 1], V = [0.5, 0.5, 0.5], gamma = 1, lam = 0.5
    # deltas: 0 + 0.5 - 0.5 = 0, 0, 1 - 0.5 = 0.5 -> A = [0.125, 0.25, 0.5]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 0.75, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_equals_the_discounted_sum_of_td_errors(gamma, lam):
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    adv, _ = gae(r[None], v[None], torch.ones(1, 7), gamma, lam)
    expected = torch.tensor(_discounted_definition(r.tolist(), v.tolist(), gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv[0], expected)


def test_gae_with_left_padding_and_early_eos_equals_the_unpadded_rows():
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(4, generator=g), torch.randn(4, generator=g)
    mask = torch.tensor([[0.0, 0, 1, 1, 1, 1], [1.0, 1, 1, 1, 0, 0]])
    rewards = torch.stack([torch.cat([torch.full((2,), 9.0), r]), torch.cat([r, torch.full((2,), 9.0)])])
    values = torch.stack([torch.cat([torch.full((2,), 9.0), v]), torch.cat([v, torch.full((2,), 9.0)])])
    adv, _ = gae(rewards, values, mask, 0.95, 0.9)
    expected = torch.tensor(_discounted_definition(r.tolist(), v.tolist(), 0.95, 0.9))
    torch.testing.assert_close(adv[0, 2:], expected)
    torch.testing.assert_close(adv[1, :4], expected)
    assert adv[0, :2].abs().sum() == 0 and adv[1, 4:].abs().sum() == 0


def test_group_advantages_by_hand():
    s = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    torch.testing.assert_close(group_advantages(s, 2, "none"), torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    torch.testing.assert_close(group_advantages(s, 2, "std", eps=0.0)[:2], torch.tensor([-1.0, 1.0]))
    # RLOO: 1 - 3 = -2, 3 - 1 = 2
    torch.testing.assert_close(group_advantages(s, 2, "loo")[:2], torch.tensor([-2.0, 2.0]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(s, 4)


def test_ppo_policy_loss_clips_by_hand():
    # ratios 1.5 and 0.5 with advantages +1 and -1, clip 0.2:
    # token 1: min(1.5, 1.2) = 1.2; token 2: min(-0.5, -0.8) = -0.8 -> loss = -(1.2 - 0.8) / 2 = -0.2
    old = torch.log(torch.tensor([[0.2, 0.4]]))
    new = torch.log(torch.tensor([[0.3, 0.2]])).requires_grad_()
    loss, stats = ppo_policy_loss(new, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.2))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(1.0))
    (grad,) = torch.autograd.grad(loss, new)
    assert grad.abs().sum() == 0  # both tokens are clipped: no gradient


def test_ppo_value_loss_takes_the_larger_of_clipped_and_unclipped():
    # V = 2, V_old = 0, R = 0, clip 0.5: unclipped (2-0)^2 = 4, clipped (0.5-0)^2 = 0.25 -> 0.5 * 4
    loss = ppo_value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.5)
    torch.testing.assert_close(loss, torch.tensor(2.0))
