"""aggregate(): masked reductions worked out by hand, and the global reduction over 2 gloo ranks."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klbelt import MODES, aggregate, aggregate_many

NAN, INF = float("nan"), float("inf")

# 3 sequences of 4 tokens; the middle one is entirely masked. Masked positions hold garbage.
VALUES = [[1.0, 2.0, INF, NAN], [NAN, 6.0, 7.0, 8.0], [9.0, -5.0, 11.0, 12.0]]
MASK = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]
# by hand: valid tokens 1, 2 | - | 9, 11, 12
#   token-mean          = (1 + 2 + 9 + 11 + 12) / 5          = 35 / 5 = 7
#   seq-mean-token-mean = ((1 + 2) / 2 + (9 + 11 + 12) / 3) / 2 = (3/2 + 32/3) / 2 = 73 / 12
#   seq-mean-token-sum  = ((1 + 2) + (9 + 11 + 12)) / 2       = 35 / 2
BY_HAND = {"token-mean": 7.0, "seq-mean-token-mean": 73 / 12, "seq-mean-token-sum": 17.5}
# d/dv at the valid positions: 1/5 each | 1/(2*2) row 0, 1/(3*2) row 2 | 1/2 each
GRAD_BY_HAND = {
    "token-mean": [[0.2, 0.2, 0, 0], [0, 0, 0, 0], [0.2, 0, 0.2, 0.2]],
    "seq-mean-token-mean": [[0.25, 0.25, 0, 0], [0, 0, 0, 0], [1 / 6, 0, 1 / 6, 1 / 6]],
    "seq-mean-token-sum": [[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0.5, 0, 0.5, 0.5]],
}


def values_and_mask(dtype=torch.float64, mask_dtype=torch.bool):
    return torch.tensor(VALUES, dtype=dtype), torch.tensor(MASK).to(mask_dtype)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_modes_match_hand_worked_example(mode):
    values, mask = values_and_mask()
    out = aggregate(values, mask, mode)
    assert out.shape == () and out.dtype == torch.float64
    assert out.item() == pytest.approx(BY_HAND[mode], rel=1e-14)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64, torch.uint8], ids=str)
def test_bool_and_zero_one_masks_give_the_same_result(mode, mask_dtype):
    values, mask = values_and_mask(mask_dtype=mask_dtype)
    assert aggregate(values, mask, mode).item() == pytest.approx(BY_HAND[mode], rel=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_flows_to_valid_positions_only_with_the_hand_worked_weights(mode):
    values, mask = values_and_mask()
    values.requires_grad_()
    aggregate(values, mask, mode).backward()
    torch.testing.assert_close(values.grad, torch.tensor(GRAD_BY_HAND[mode], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_rows_contribute_nothing(mode):
    values, mask = values_and_mask()
    keep = torch.tensor([0, 2])
    assert aggregate(values, mask, mode).item() == pytest.approx(aggregate(values[keep], mask[keep], mode).item(), rel=1e-14)
    # more empty rows with any content change nothing
    extra_values = torch.cat([values, torch.full((3, 4), 1e6, dtype=torch.float64)])
    extra_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)])
    assert aggregate(extra_values, extra_mask, mode).item() == pytest.approx(BY_HAND[mode], rel=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_an_entirely_masked_batch_gives_zero_with_a_zero_gradient(mode):
    values = torch.tensor([[NAN, 3.0], [1.0, 2.0]], requires_grad=True)
    out = aggregate(values, torch.zeros(2, 2, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert (values.grad == 0).all()


def test_seq_mean_token_mean_weighs_sequences_equally_unlike_token_mean():
    # one long sequence of ones, one short sequence of a single 10
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [10.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(14 / 5)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 10) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((4 + 10) / 2)


def test_token_mean_is_the_default_mode():
    values, mask = values_and_mask()
    assert aggregate(values, mask).item() == pytest.approx(7.0)


@pytest.mark.parametrize("mode", MODES)
def test_leading_dimensions_are_flattened_into_sequences(mode):
    values, mask = values_and_mask()
    values3, mask3 = values.reshape(3, 1, 4).expand(3, 2, 4), mask.reshape(3, 1, 4).expand(3, 2, 4)
    assert aggregate(values3, mask3, mode).item() == pytest.approx(BY_HAND[mode], rel=1e-14)


def test_a_single_sequence_of_shape_t():
    values = torch.tensor([2.0, 4.0, NAN])
    mask = torch.tensor([1, 1, 0])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(3.0)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx(6.0)


def test_result_keeps_the_float32_dtype():
    values, mask = values_and_mask(dtype=torch.float32)
    assert aggregate(values, mask, "seq-mean-token-mean").dtype == torch.float32


# ----------------------------------------------------------------- global reduction over 2 gloo ranks

# Uneven per rank: rank 0 has 3 rows of 4 tokens, rank 1 has 2 rows of 6 (one all masked).
RANK_DATA = [
    (
        [[0.5, -1.0, 2.0, 3.0], [4.0, 1.5, NAN, NAN], [-2.0, 0.25, 1.0, 7.0]],
        [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]],
    ),
    (
        [[3.0, 1.0, -4.0, 2.5, 0.5, 6.0], [NAN, 1.0, 1.0, 1.0, 1.0, 1.0]],
        [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]],
    ),
]


def concatenated_batch():
    """Both ranks' rows in one batch, padded (masked) to the longest sequence."""
    width = max(len(v[0]) for v, _ in RANK_DATA)
    rows_v, rows_m = [], []
    for values, mask in RANK_DATA:
        for v, m in zip(values, mask):
            pad = width - len(v)
            rows_v.append(v + [0.0] * pad)
            rows_m.append(m + [0] * pad)
    return torch.tensor(rows_v, dtype=torch.float64), torch.tensor(rows_m, dtype=torch.bool)


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        values, mask = RANK_DATA[rank]
        results = {}
        for mode in MODES:
            v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
            out = aggregate(v, torch.tensor(mask), mode, group=dist.group.WORLD)
            out.backward()
            results[mode] = (out.detach(), v.grad)
        # all three modes at once: one all-reduce, same values and gradients
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls.append(1)
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        outs = aggregate_many([v, v * 2, v], torch.tensor(mask), list(MODES), group=dist.group.WORLD)
        dist.all_reduce = real_all_reduce
        sum(outs).backward()
        results["many"] = ([o.detach() for o in outs], v.grad, len(calls))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_reduction_over_two_gloo_ranks_equals_the_concatenated_batch(tmp_path):
    world_size = 2
    ctx = mp.start_processes(
        _dist_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the gloo ranks did not finish in 120 s")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    all_values, all_mask = concatenated_batch()
    for mode in MODES:
        v = all_values.clone().requires_grad_()
        expected = aggregate(v, all_mask, mode)
        expected.backward()
        # identical on every rank, and equal to the single-process result on the whole batch
        assert torch.equal(per_rank[0][mode][0], per_rank[1][mode][0])
        assert per_rank[0][mode][0].item() == pytest.approx(expected.item(), rel=1e-14)
        # each rank's gradient is the whole-batch gradient restricted to its own rows (global denominator)
        row = 0
        for r, (values, _) in enumerate(RANK_DATA):
            n_rows, width = len(values), len(values[0])
            torch.testing.assert_close(per_rank[r][mode][1], v.grad[row : row + n_rows, :width], rtol=1e-14, atol=0)
            row += n_rows

    # aggregate_many: one all-reduce for all three, each value as aggregate gives it (the second is x2)
    for r in range(world_size):
        outs, grad, n_calls = per_rank[r]["many"]
        assert n_calls == 1
        for i, mode in enumerate(MODES):
            assert outs[i].item() == pytest.approx(per_rank[r][mode][0].item() * (2 if i == 1 else 1), rel=1e-14)
        expected_grad = sum(per_rank[r][mode][1] * (2 if i == 1 else 1) for i, mode in enumerate(MODES))
        torch.testing.assert_close(grad, expected_grad, rtol=1e-14, atol=1e-15)

    # and it is not the mean of the per-rank results
    for mode in MODES:
        local = [aggregate(torch.tensor(vals, dtype=torch.float64), torch.tensor(m), mode).item() for vals, m in RANK_DATA]
        assert per_rank[0][mode][0].item() != pytest.approx(sum(local) / 2, rel=1e-6)


def test_aggregate_many_without_a_group_is_a_list_of_aggregates():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    outs = aggregate_many([values, values.square()], mask, ["token-mean", "seq-mean-token-sum"])
    assert outs[0].item() == aggregate(values, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert outs[1].item() == aggregate(values.square(), mask, "seq-mean-token-sum").item() == pytest.approx((5 + 16) / 2)


def test_aggregate_many_names_a_bad_value_and_refuses_mismatched_modes():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"values\[1\]"):
        aggregate_many([torch.zeros(2, 3), torch.zeros(2, 4)], mask, ["token-mean", "token-mean"])
    with pytest.raises(ValueError, match="one mode per value"):
        aggregate_many([torch.zeros(2, 3)], mask, ["token-mean", "token-mean"])
    with pytest.raises(TypeError, match="non-empty list"):
        aggregate_many([], mask, [])
