"""Every bad input raises a ValueError or TypeError whose message names the argument.

docs/design.md, "What bad input gets": never a silent broadcast, never a NaN passed on.
"""

from __future__ import annotations

import pytest
import torch

from klbelt import (
    aggregate,
    compute_kl_penalty,
    compute_rewards_with_kl,
    kl_from_logits,
    kl_per_token,
    logprobs_from_logits,
    shape_rewards,
)
from klbelt.kl import set_backend

NAN, INF = float("nan"), float("inf")


def lp(*shape):
    """Valid log-probabilities."""
    return -torch.rand(*shape, generator=torch.Generator().manual_seed(0)) - 0.1


def logits(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def toks(*shape, high=5):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(2))


def with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def shape_args(**overrides):
    args = dict(scores=torch.zeros(2), logprobs=lp(2, 3), ref_logprobs=lp(2, 3), mask=torch.ones(2, 3), kl_coef=0.1)
    args.update(overrides)
    return args


CASES = {
    # ---------------------------------------------------------------- kl_per_token
    "kl_per_token: mismatched shapes": (lambda: kl_per_token(lp(2, 3), lp(3, 2)), ValueError, "ref_logprobs"),
    "kl_per_token: no silent broadcast": (lambda: kl_per_token(lp(2, 3), lp(1, 3)), ValueError, "ref_logprobs"),
    "kl_per_token: integer logprobs": (lambda: kl_per_token(torch.zeros(3, dtype=torch.long), lp(3)), TypeError, "logprobs"),
    "kl_per_token: list logprobs": (lambda: kl_per_token([-1.0, -2.0], lp(2)), TypeError, "logprobs"),
    "kl_per_token: integer ref": (lambda: kl_per_token(lp(3), torch.zeros(3, dtype=torch.int32)), TypeError, "ref_logprobs"),
    "kl_per_token: NaN logprobs": (lambda: kl_per_token(with_value(lp(3), 1, NAN), lp(3)), ValueError, "logprobs"),
    "kl_per_token: -inf logprobs": (lambda: kl_per_token(with_value(lp(3), 1, -INF), lp(3)), ValueError, "logprobs"),
    "kl_per_token: inf ref": (lambda: kl_per_token(lp(3), with_value(lp(3), 0, INF)), ValueError, "ref_logprobs"),
    "kl_per_token: logprob above 0": (lambda: kl_per_token(with_value(lp(3), 2, 0.5), lp(3)), ValueError, "logprobs.*<= 0"),
    "kl_per_token: ref above 0": (lambda: kl_per_token(lp(3), with_value(lp(3), 2, 0.5)), ValueError, "ref_logprobs.*<= 0"),
    "kl_per_token: unknown estimator": (
        lambda: kl_per_token(lp(3), lp(3), "k4"),
        ValueError,
        r"estimator.*'k1'.*'k2'.*'k3'.*'abs'.*'k4'",
    ),
    # ---------------------------------------------------------------- logprobs_from_logits
    "logprobs: integer logits": (lambda: logprobs_from_logits(toks(2, 5), toks(2)), TypeError, "logits"),
    "logprobs: float tokens": (lambda: logprobs_from_logits(logits(2, 5), toks(2).float()), TypeError, "tokens"),
    "logprobs: bool tokens": (lambda: logprobs_from_logits(logits(2, 5), toks(2).bool()), TypeError, "tokens"),
    "logprobs: token == V": (lambda: logprobs_from_logits(logits(2, 5), torch.tensor([0, 5])), ValueError, r"tokens.*\[0, 5\)"),
    "logprobs: negative token": (lambda: logprobs_from_logits(logits(2, 5), torch.tensor([-1, 0])), ValueError, "tokens"),
    "logprobs: tokens shape": (lambda: logprobs_from_logits(logits(2, 3, 5), toks(2, 4)), ValueError, "tokens.*shape"),
    "logprobs: tokens broadcast": (lambda: logprobs_from_logits(logits(2, 3, 5), toks(1, 3)), ValueError, "tokens.*shape"),
    "logprobs: 0-d logits": (lambda: logprobs_from_logits(torch.tensor(1.0), torch.tensor(0)), ValueError, "logits"),
    "logprobs: empty vocabulary": (lambda: logprobs_from_logits(torch.zeros(2, 0), toks(2)), ValueError, "logits"),
    "logprobs: NaN logits": (lambda: logprobs_from_logits(with_value(logits(2, 5), (0, 3), NAN), toks(2)), ValueError, "logits"),
    "logprobs: +inf logits": (lambda: logprobs_from_logits(with_value(logits(2, 5), (1, 1), INF), toks(2)), ValueError, "logits"),
    "logprobs: chosen token at -inf": (
        lambda: logprobs_from_logits(with_value(logits(2, 5), (0, 0), -INF), torch.tensor([0, 1])),
        ValueError,
        "logits",
    ),
    "logprobs: temperature 0": (lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature=0.0), ValueError, "temperature"),
    "logprobs: temperature < 0": (lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature=-1), ValueError, "temperature"),
    "logprobs: temperature NaN": (lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature=NAN), ValueError, "temperature"),
    "logprobs: temperature inf": (lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature=INF), ValueError, "temperature"),
    "logprobs: tensor temperature 0": (
        lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature=torch.tensor(0.0)),
        ValueError,
        "temperature",
    ),
    "logprobs: temperature str": (lambda: logprobs_from_logits(logits(2, 5), toks(2), temperature="1"), TypeError, "temperature"),
    "logprobs: chunk_size 0": (lambda: logprobs_from_logits(logits(2, 5), toks(2), chunk_size=0), ValueError, "chunk_size"),
    "logprobs: chunk_size -1": (lambda: logprobs_from_logits(logits(2, 5), toks(2), chunk_size=-1), ValueError, "chunk_size"),
    "logprobs: chunk_size float": (lambda: logprobs_from_logits(logits(2, 5), toks(2), chunk_size=1.5), TypeError, "chunk_size"),
    "logprobs: chunk_size bool": (lambda: logprobs_from_logits(logits(2, 5), toks(2), chunk_size=True), TypeError, "chunk_size"),
    # ---------------------------------------------------------------- kl_from_logits
    "kl_from_logits: mismatched shapes": (lambda: kl_from_logits(logits(2, 5), logits(2, 6)), ValueError, "ref_logits"),
    "kl_from_logits: no broadcast": (lambda: kl_from_logits(logits(2, 5), logits(1, 5)), ValueError, "ref_logits"),
    "kl_from_logits: integer logits": (lambda: kl_from_logits(toks(2, 5), logits(2, 5)), TypeError, "logits"),
    "kl_from_logits: integer ref": (lambda: kl_from_logits(logits(2, 5), toks(2, 5)), TypeError, "ref_logits"),
    "kl_from_logits: unknown direction": (
        lambda: kl_from_logits(logits(2, 5), logits(2, 5), direction="both"),
        ValueError,
        r"direction.*'reverse'.*'forward'",
    ),
    "kl_from_logits: NaN logits": (lambda: kl_from_logits(with_value(logits(2, 5), (0, 0), NAN), logits(2, 5)), ValueError, "logits"),
    "kl_from_logits: NaN ref": (lambda: kl_from_logits(logits(2, 5), with_value(logits(2, 5), (1, 4), NAN)), ValueError, "ref_logits"),
    "kl_from_logits: +inf ref": (lambda: kl_from_logits(logits(2, 5), with_value(logits(2, 5), (1, 4), INF)), ValueError, "ref_logits"),
    "kl_from_logits: ref has no mass where policy has": (
        lambda: kl_from_logits(logits(2, 5), with_value(logits(2, 5), (0, 2), -INF)),
        ValueError,
        "ref_logits",
    ),
    "kl_from_logits: forward, policy has no mass where ref has": (
        lambda: kl_from_logits(with_value(logits(2, 5), (0, 2), -INF), logits(2, 5), direction="forward"),
        ValueError,
        "logits",
    ),
    "kl_from_logits: temperature 0": (lambda: kl_from_logits(logits(2, 5), logits(2, 5), temperature=0), ValueError, "temperature"),
    "kl_from_logits: chunk_size 0": (lambda: kl_from_logits(logits(2, 5), logits(2, 5), chunk_size=0), ValueError, "chunk_size"),
    "kl_from_logits: chunk_size str": (lambda: kl_from_logits(logits(2, 5), logits(2, 5), chunk_size="2"), TypeError, "chunk_size"),
    # ---------------------------------------------------------------- aggregate
    "aggregate: integer values": (lambda: aggregate(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)), TypeError, "values"),
    "aggregate: 0-d values": (lambda: aggregate(torch.tensor(1.0), torch.tensor(1)), ValueError, "values"),
    "aggregate: mask wrong shape": (lambda: aggregate(torch.ones(2, 3), torch.ones(2, 4)), ValueError, "mask"),
    "aggregate: mask would broadcast": (lambda: aggregate(torch.ones(2, 3), torch.ones(1, 3)), ValueError, "mask"),
    "aggregate: mask value 2": (lambda: aggregate(torch.ones(2, 3), torch.tensor([[1, 2, 0], [1, 1, 1]])), ValueError, "mask.*0 and 1"),
    "aggregate: mask value 0.5": (lambda: aggregate(torch.ones(2, 3), torch.full((2, 3), 0.5)), ValueError, "mask"),
    "aggregate: mask value -1": (lambda: aggregate(torch.ones(2, 3), -torch.ones(2, 3)), ValueError, "mask"),
    "aggregate: mask not a tensor": (lambda: aggregate(torch.ones(2, 3), [[1, 1, 1], [1, 1, 1]]), TypeError, "mask"),
    "aggregate: unknown mode": (
        lambda: aggregate(torch.ones(2, 3), torch.ones(2, 3), "mean"),
        ValueError,
        r"mode.*'token-mean'.*'seq-mean-token-mean'.*'seq-mean-token-sum'",
    ),
    "aggregate: NaN at a valid position": (
        lambda: aggregate(with_value(torch.ones(2, 3), (0, 1), NAN), torch.ones(2, 3)),
        ValueError,
        "values",
    ),
    "aggregate: inf at a valid position": (
        lambda: aggregate(with_value(torch.ones(2, 3), (1, 2), INF), torch.ones(2, 3), "seq-mean-token-sum"),
        ValueError,
        "values",
    ),
    "aggregate: group without torch.distributed": (
        lambda: aggregate(torch.ones(2, 3), torch.ones(2, 3), group=object()),
        ValueError,
        "group",
    ),
    # ---------------------------------------------------------------- compute_kl_penalty
    "kl_penalty: negative kl_coef": (lambda: compute_kl_penalty(lp(3), lp(3), kl_coef=-0.1), ValueError, "kl_coef"),
    "kl_penalty: NaN kl_coef": (lambda: compute_kl_penalty(lp(3), lp(3), kl_coef=NAN), ValueError, "kl_coef"),
    "kl_penalty: inf kl_coef": (lambda: compute_kl_penalty(lp(3), lp(3), kl_coef=INF), ValueError, "kl_coef"),
    "kl_penalty: str kl_coef": (lambda: compute_kl_penalty(lp(3), lp(3), kl_coef="0.1"), TypeError, "kl_coef"),
    "kl_penalty: NaN logprobs": (lambda: compute_kl_penalty(with_value(lp(3), 0, NAN), lp(3)), ValueError, "logprobs"),
    "kl_penalty: logprobs above 0": (lambda: compute_kl_penalty(with_value(lp(3), 0, 1.0), lp(3)), ValueError, "logprobs"),
    "kl_penalty: empty logprobs (mean of nothing)": (
        lambda: compute_kl_penalty(torch.empty(0), torch.empty(0)),
        ValueError,
        "logprobs",
    ),
    "kl_penalty: mismatched shapes": (lambda: compute_kl_penalty(lp(3), lp(4)), ValueError, "ref_logprobs"),
    # ---------------------------------------------------------------- compute_rewards_with_kl
    "rewards_with_kl: NaN rewards": (
        lambda: compute_rewards_with_kl(with_value(torch.zeros(3), 1, NAN), lp(3), lp(3)),
        ValueError,
        "rewards",
    ),
    "rewards_with_kl: inf rewards": (
        lambda: compute_rewards_with_kl(with_value(torch.zeros(3), 1, -INF), lp(3), lp(3)),
        ValueError,
        "rewards",
    ),
    "rewards_with_kl: rewards shape": (lambda: compute_rewards_with_kl(torch.zeros(4), lp(3), lp(3)), ValueError, "rewards"),
    "rewards_with_kl: rewards would broadcast": (
        lambda: compute_rewards_with_kl(torch.zeros(1), lp(3), lp(3)),
        ValueError,
        "rewards",
    ),
    "rewards_with_kl: integer rewards": (
        lambda: compute_rewards_with_kl(torch.zeros(3, dtype=torch.long), lp(3), lp(3)),
        TypeError,
        "rewards",
    ),
    "rewards_with_kl: NaN policy_logprobs": (
        lambda: compute_rewards_with_kl(torch.zeros(3), with_value(lp(3), 2, NAN), lp(3)),
        ValueError,
        "logprobs",
    ),
    "rewards_with_kl: ref above 0": (
        lambda: compute_rewards_with_kl(torch.zeros(3), lp(3), with_value(lp(3), 2, 0.3)),
        ValueError,
        "ref_logprobs",
    ),
    "rewards_with_kl: negative kl_coef": (
        lambda: compute_rewards_with_kl(torch.zeros(3), lp(3), lp(3), kl_coef=-1.0),
        ValueError,
        "kl_coef",
    ),
    # ---------------------------------------------------------------- shape_rewards
    "shape_rewards: NaN score": (lambda: shape_rewards(**shape_args(scores=torch.tensor([0.0, NAN]))), ValueError, "scores"),
    "shape_rewards: inf score": (lambda: shape_rewards(**shape_args(scores=torch.tensor([INF, 0.0]))), ValueError, "scores"),
    "shape_rewards: scores shape": (lambda: shape_rewards(**shape_args(scores=torch.zeros(3))), ValueError, "scores"),
    "shape_rewards: scores [B, 1]": (lambda: shape_rewards(**shape_args(scores=torch.zeros(2, 1))), ValueError, "scores"),
    "shape_rewards: integer scores": (
        lambda: shape_rewards(**shape_args(scores=torch.zeros(2, dtype=torch.long))),
        TypeError,
        "scores",
    ),
    "shape_rewards: 1-D logprobs": (
        lambda: shape_rewards(**shape_args(logprobs=lp(3), ref_logprobs=lp(3), mask=torch.ones(3))),
        ValueError,
        "logprobs",
    ),
    "shape_rewards: ref shape": (lambda: shape_rewards(**shape_args(ref_logprobs=lp(2, 4))), ValueError, "ref_logprobs"),
    "shape_rewards: mask shape": (lambda: shape_rewards(**shape_args(mask=torch.ones(2, 4))), ValueError, "mask"),
    "shape_rewards: mask values": (lambda: shape_rewards(**shape_args(mask=torch.full((2, 3), 3))), ValueError, "mask"),
    "shape_rewards: NaN at a valid position": (
        lambda: shape_rewards(**shape_args(logprobs=with_value(lp(2, 3), (1, 1), NAN))),
        ValueError,
        "logprobs",
    ),
    "shape_rewards: ref above 0 at a valid position": (
        lambda: shape_rewards(**shape_args(ref_logprobs=with_value(lp(2, 3), (0, 2), 2.0))),
        ValueError,
        "ref_logprobs",
    ),
    "shape_rewards: negative kl_coef": (lambda: shape_rewards(**shape_args(kl_coef=-0.5)), ValueError, "kl_coef"),
    "shape_rewards: NaN kl_coef": (lambda: shape_rewards(**shape_args(kl_coef=NAN)), ValueError, "kl_coef"),
    "shape_rewards: negative tensor kl_coef": (
        lambda: shape_rewards(**shape_args(kl_coef=torch.tensor(-0.5))),
        ValueError,
        "kl_coef",
    ),
    "shape_rewards: inf tensor kl_coef": (lambda: shape_rewards(**shape_args(kl_coef=torch.tensor(INF))), ValueError, "kl_coef"),
    "shape_rewards: multi-element kl_coef": (lambda: shape_rewards(**shape_args(kl_coef=torch.ones(2))), TypeError, "kl_coef"),
    "shape_rewards: bool kl_coef": (lambda: shape_rewards(**shape_args(kl_coef=True)), TypeError, "kl_coef"),
    "shape_rewards: unknown estimator": (
        lambda: shape_rewards(**shape_args(), estimator="k4"),  # "kl" is verl's name for k1 (accepted)
        ValueError,
        r"estimator.*'k1'.*'k2'.*'k3'.*'abs'",
    ),
    # ---------------------------------------------------------------- backend switch
    "set_backend: unknown backend": (lambda: set_backend("fast"), ValueError, r"backend.*'auto'.*'compile'.*'eager'"),
}


@pytest.mark.parametrize("call, exc, match", list(CASES.values()), ids=list(CASES))
def test_bad_input_raises_an_error_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_all_masked_rows_are_legal_everywhere():
    values = torch.tensor([[1.0, 2.0], [NAN, NAN]])
    mask = torch.tensor([[1, 1], [0, 0]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.isfinite(aggregate(values, mask, mode))
    out = shape_rewards(torch.zeros(2), torch.tensor([[-1.0, -1.0], [NAN, 5.0]]), torch.full((2, 2), -1.0), mask, 0.1)
    assert torch.isfinite(out.rewards).all()


def test_error_messages_say_what_was_got_and_what_was_expected():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        kl_per_token(lp(2, 3), lp(3, 2))
    with pytest.raises(TypeError, match=r"torch\.int64"):
        logprobs_from_logits(toks(2, 5), toks(2))
    with pytest.raises(ValueError, match=r"'k4'"):
        kl_per_token(lp(3), lp(3), "k4")
    with pytest.raises(ValueError, match=r"-0\.5"):
        compute_kl_penalty(lp(3), lp(3), kl_coef=-0.5)
