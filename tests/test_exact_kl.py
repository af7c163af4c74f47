"""kl_from_logits against a naive float64 KL over the whole vocabulary, values and gradients.

Truth: with p = softmax(a / T), q = softmax(b / T) computed by torch in float64
from the SAME (already rounded) logits, KL(p||q) = sum_v p_v (log p_v - log q_v);
"reverse" is KL(policy||ref), "forward" is KL(ref||policy). Gradients are
torch.autograd through that naive formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from klbelt import kl_from_logits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FWD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 5e-6), torch.bfloat16: (1e-5, 5e-6), torch.float16: (1e-5, 5e-6)}
BWD_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-6)}


def naive_kl(logits, ref_logits, direction="reverse", temperature=1.0):
    """float64 KL over the vocabulary; entries with p = 0 contribute 0."""
    a, b = (logits, ref_logits) if direction == "reverse" else (ref_logits, logits)
    logp = torch.log_softmax(a.double() / temperature, -1)
    logq = torch.log_softmax(b.double() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def make_pair(shape, dtype, gen, scale=2.0, spread=1.0):
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    ref_logits = logits + torch.randn(*shape, generator=gen, dtype=torch.float64) * spread
    return logits.to(dtype), ref_logits.to(dtype)


def check_against_naive(logits, ref_logits, direction, temperature, chunk_size, gen):
    x = logits.clone().requires_grad_()
    y = ref_logits.clone().requires_grad_()
    out = kl_from_logits(x, y, direction=direction, temperature=temperature, chunk_size=chunk_size)
    assert out.shape == logits.shape[:-1]
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)

    x64 = logits.double().requires_grad_()
    y64 = ref_logits.double().requires_grad_()
    want = naive_kl(x64, y64, direction, temperature)
    rtol, atol = FWD_TOL[logits.dtype]
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=atol)

    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (want * weights).sum().backward()
    assert x.grad.dtype == logits.dtype and y.grad.dtype == ref_logits.dtype
    rtol, atol = BWD_TOL[logits.dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 31), (2, 4, 31)], ids=["TV", "BTV"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_exact_kl_and_gradients_match_naive_float64_kl(dtype, shape, direction, temperature, chunk_size, gen, kl_backend):
    kl_backend("eager")
    logits, ref_logits = make_pair(shape, dtype, gen)
    check_against_naive(logits, ref_logits, direction, temperature, chunk_size, gen)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_compiled_exact_kl_and_gradients_match_naive_float64_kl(direction, gen, compiled_kernels):
    logits, ref_logits = make_pair((2, 3, 11), torch.float32, gen)
    check_against_naive(logits, ref_logits, direction, 1.3, None, gen)


def test_gradient_only_wrt_the_policy_when_the_reference_is_frozen(gen):
    logits, ref_logits = make_pair((4, 9), torch.float64, gen)
    x = logits.clone().requires_grad_()
    kl_from_logits(x, ref_logits).sum().backward()
    x64 = logits.clone().requires_grad_()
    naive_kl(x64, ref_logits).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-9, atol=1e-12)


def test_reverse_kl_gradient_has_its_closed_form():
    # d KL(p||q) / da = p * (log p - log q - KL) / T ;  d KL(p||q) / db = (q - p) / T
    a = torch.tensor([[1.0, -0.5, 0.3, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.2, 0.1, -1.0, 1.5]], dtype=torch.float64, requires_grad=True)
    t = 1.5
    kl = kl_from_logits(a, b, temperature=t)
    kl.sum().backward()
    logp = torch.log_softmax(a.detach() / t, -1)
    logq = torch.log_softmax(b.detach() / t, -1)
    p, q = logp.exp(), logq.exp()
    value = (p * (logp - logq)).sum()
    assert kl.item() == pytest.approx(value.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, p * (logp - logq - value) / t, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b.grad, (q - p) / t, rtol=1e-10, atol=1e-14)


def test_forward_direction_is_reverse_with_the_arguments_swapped(gen):
    logits, ref_logits = make_pair((3, 5, 17), torch.float64, gen)
    forward = kl_from_logits(logits, ref_logits, direction="forward")
    torch.testing.assert_close(forward, kl_from_logits(ref_logits, logits, direction="reverse"))
    assert not torch.allclose(forward, kl_from_logits(logits, ref_logits), rtol=1e-3)


def test_reverse_is_the_default_direction(gen):
    logits, ref_logits = make_pair((3, 17), torch.float64, gen)
    torch.testing.assert_close(kl_from_logits(logits, ref_logits), naive_kl(logits, ref_logits, "reverse"))


def test_kl_is_zero_for_identical_distributions_and_for_shifted_logits(gen):
    logits, _ = make_pair((4, 23), torch.float64, gen)
    shift = torch.randn(4, 1, generator=gen, dtype=torch.float64) * 50  # softmax is shift invariant
    for direction in ("reverse", "forward"):
        kl = kl_from_logits(logits, logits + shift, direction=direction)
        torch.testing.assert_close(kl, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_kl_of_two_coins_matches_the_hand_computed_value():
    # p = (0.7, 0.3), q = (0.3, 0.7): KL = 0.7 ln(7/3) + 0.3 ln(3/7) = 0.4 ln(7/3)
    p = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    kl = kl_from_logits(p.log(), q.log())
    assert kl.item() == pytest.approx(0.4 * math.log(7 / 3), rel=1e-12)


def test_mixed_precision_policy_and_reference_are_accepted(gen):
    logits, ref_logits = make_pair((5, 19), torch.float64, gen)
    x = logits.to(torch.bfloat16).requires_grad_()
    y = ref_logits.to(torch.float32).requires_grad_()
    out = kl_from_logits(x, y, temperature=0.9)
    want = naive_kl(x.detach(), y.detach(), temperature=0.9)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=5e-6)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_vocabulary_entries_masked_in_both_at_minus_inf_are_excluded(dtype, direction, chunk_size, gen, kl_backend):
    kl_backend("eager")
    logits, ref_logits = make_pair((5, 12), dtype, gen)
    banned = torch.zeros(5, 12, dtype=torch.bool)
    banned[:, ::4] = True
    x = logits.masked_fill(banned, float("-inf")).requires_grad_()
    y = ref_logits.masked_fill(banned, float("-inf")).requires_grad_()
    out = kl_from_logits(x, y, direction=direction, chunk_size=chunk_size)
    assert torch.isfinite(out).all()
    # truth: the KL over the allowed entries only, with gradients
    allowed = ~banned[0]
    x64 = logits[:, allowed].double().requires_grad_()
    y64 = ref_logits[:, allowed].double().requires_grad_()
    want = naive_kl(x64, y64, direction)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=tol)
    out.sum().backward()
    want.sum().backward()
    for got, truth in ((x.grad, x64.grad), (y.grad, y64.grad)):
        assert torch.isfinite(got).all()
        assert (got[banned] == 0).all()
        rtol, atol = BWD_TOL[dtype]
        torch.testing.assert_close(got[:, allowed].double(), truth, rtol=rtol, atol=atol)


def test_policy_zero_mass_where_the_reference_has_mass_gives_a_finite_reverse_kl(gen):
    # reverse KL sums over the policy's support only: entries with pi = 0 contribute 0
    logits, ref_logits = make_pair((3, 8), torch.float64, gen)
    banned = torch.zeros(3, 8, dtype=torch.bool)
    banned[:, 2] = True
    x = logits.masked_fill(banned, float("-inf")).requires_grad_()
    y = ref_logits.clone().requires_grad_()
    out = kl_from_logits(x, y)
    logp = torch.log_softmax(logits[:, ~banned[0]], -1)
    logq_full = torch.log_softmax(ref_logits, -1)
    want = (logp.exp() * (logp - logq_full[:, ~banned[0]])).sum(-1)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[banned] == 0).all()
    # d/db = q - p, and p = 0 on the banned entry
    torch.testing.assert_close(y.grad[banned], logq_full.exp()[banned], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [1e2, -1e2])
def test_large_magnitude_logits_are_stable(dtype, offset, gen, kl_backend):
    kl_backend("eager")
    logits, ref_logits = make_pair((6, 16), dtype, gen, scale=5.0, spread=0.5)
    a, b = logits + offset, ref_logits + offset
    out = kl_from_logits(a, b, chunk_size=4)
    assert torch.isfinite(out).all() and (out > -1e-5).all()
    # computation error of an fp32 kernel: a few ulps of the logits' magnitude
    atol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps * abs(offset)
    torch.testing.assert_close(out.double(), naive_kl(a, b), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_logits_offset_by_1e4_give_a_finite_nonnegative_kl_without_overflow(offset, gen):
    logits, ref_logits = make_pair((6, 16), torch.float64, gen, scale=5.0, spread=0.5)
    a, b = (logits + offset).float(), (ref_logits + offset).float()
    out = kl_from_logits(a, b)
    assert torch.isfinite(out).all()
    # within a few ulps (at 1e4) of the exact KL of these rounded inputs
    torch.testing.assert_close(out.double(), naive_kl(a, b), rtol=0, atol=8 * torch.finfo(torch.float32).eps * abs(offset))
    a64, b64 = logits + offset, ref_logits + offset
    torch.testing.assert_close(kl_from_logits(a64, b64), naive_kl(a64, b64), rtol=1e-9, atol=1e-10)


def test_kl_with_logits_offset_by_1e4_is_as_accurate_as_a_float32_log_softmax(gen):
    logits, ref_logits = make_pair((64, 16), torch.float64, gen, scale=2.0, spread=0.3)
    a, b = (logits + 1e4).float(), (ref_logits + 1e4).float()
    out = kl_from_logits(a, b).double()
    naive32 = (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum(-1).double()
    truth = naive_kl(a, b)
    assert (out - truth).abs().max() <= 10 * (naive32 - truth).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_peaked_rows_with_one_logit_far_above_the_rest_are_exact(dtype, direction, chunk_size, gen, kl_backend):
    # one entry 50 to 800 nats above the others, anywhere in a large vocabulary, in the
    # policy, the reference or both (at different places), at a low temperature
    kl_backend("eager")
    v = 257
    logits, ref_logits = make_pair((8, v), torch.float64, gen, scale=2.0, spread=0.5)
    heights = [50.0, 87.0, 95.0, 200.0, 800.0, 120.0, 300.0, 60.0]
    positions = [1, 3, 130, 255, 66, 201, 1, 7]
    for row, (height, pos) in enumerate(zip(heights, positions)):
        if row % 3 != 1:
            logits[row, pos] += height
        if row % 3 != 0:
            ref_logits[row, (pos + 5 * row) % v] += height
    logits[6, 2::5] = float("-inf")  # a masked vocabulary, the same entries in both
    ref_logits[6, 2::5] = float("-inf")
    logits, ref_logits = logits.to(dtype), ref_logits.to(dtype)
    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    out = kl_from_logits(x, y, direction=direction, temperature=0.5, chunk_size=chunk_size)
    allowed = torch.isfinite(logits[6])
    want = naive_kl(logits.double(), ref_logits.double(), direction, 0.5)
    want[6] = naive_kl(logits[6, allowed].double(), ref_logits[6, allowed].double(), direction, 0.5)
    assert torch.isfinite(out).all()
    atol = 1e-9 if dtype == torch.float64 else 2e3 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=atol)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # gradients against autograd through the naive formula (the masked row on its allowed entries)
    keep = [r for r in range(8) if r != 6]
    x64 = logits[keep].double().requires_grad_()
    y64 = ref_logits[keep].double().requires_grad_()
    naive_kl(x64, y64, direction, 0.5).sum().backward()
    rtol, g_atol = BWD_TOL[dtype]
    torch.testing.assert_close(x.grad[keep].double(), x64.grad, rtol=rtol, atol=max(g_atol, atol))
    torch.testing.assert_close(y.grad[keep].double(), y64.grad, rtol=rtol, atol=max(g_atol, atol))
