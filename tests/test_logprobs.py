"""logprobs_from_logits against a naive float64 log-softmax, values and gradients.

The truth for every input dtype is ``torch.log_softmax`` in float64 of the SAME
(already rounded) logits upcast to float64, so the tolerances measure only the
computation's error, not the input's rounding. klbelt computes in fp32 (fp64
for fp64 inputs), so the forward tolerance is an fp32 one for every low
precision input; gradients come back in the input's dtype, so their tolerance
is that dtype's relative rounding.
"""

from __future__ import annotations

import pytest
import torch

from klbelt import logprobs_from_logits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# forward: (rtol, atol) of the fp32 (fp64) computation on logits of magnitude ~10
FWD_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 2e-5), torch.bfloat16: (1e-5, 2e-5), torch.float16: (1e-5, 2e-5)}
# backward: the gradient is rounded once to the input dtype (unit roundoff 2^-8 bf16, 2^-11 fp16)
BWD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-6)}
OUT_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32}


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 log_softmax(logits / T) picked at tokens -- the reference."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_inputs(shape, dtype, gen, scale=3.0):
    logits = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return logits, tokens


def check_against_naive(logits, tokens, temperature, chunk_size, gen):
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    out = logprobs_from_logits(x, tokens, temperature=temperature, chunk_size=chunk_size)
    assert out.dtype == OUT_DTYPE[dtype]
    assert out.shape == tokens.shape

    x64 = logits.double().requires_grad_()
    want = naive_logprobs(x64, tokens, temperature)
    rtol, atol = FWD_TOL[dtype]
    torch.testing.assert_close(out.double(), want.detach(), rtol=rtol, atol=atol)

    weights = torch.randn(tokens.shape, generator=gen, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (want * weights).sum().backward()
    assert x.grad.dtype == dtype
    rtol, atol = BWD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 37), (2, 5, 37)], ids=["TV", "BTV"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_logprobs_and_gradients_match_naive_float64_log_softmax(dtype, shape, temperature, chunk_size, gen, kl_backend):
    kl_backend("eager")
    logits, tokens = make_inputs(shape, dtype, gen)
    check_against_naive(logits, tokens, temperature, chunk_size, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_logprobs_and_gradients_match_naive_float64_log_softmax(dtype, gen, compiled_kernels):
    logits, tokens = make_inputs((2, 3, 11), dtype, gen)
    check_against_naive(logits, tokens, 0.7, None, gen)


def test_chunking_does_not_change_the_result(gen, kl_backend):
    kl_backend("eager")
    logits, tokens = make_inputs((3, 4, 29), torch.float32, gen)
    outs = [logprobs_from_logits(logits, tokens, temperature=0.9, chunk_size=c) for c in (None, 1, 3, 5, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_a_single_position_of_shape_v_gives_a_scalar(gen):
    logits, tokens = make_inputs((13,), torch.float64, gen)
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == ()
    torch.testing.assert_close(out, naive_logprobs(logits, tokens), rtol=1e-12, atol=1e-12)


def test_empty_batch_gives_empty_output_and_gradient():
    x = torch.zeros(0, 4, 9, requires_grad=True)
    out = logprobs_from_logits(x, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad is None or x.grad.shape == x.shape


def test_int32_tokens_are_accepted(gen):
    logits, tokens = make_inputs((4, 10), torch.float64, gen)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens.int()), naive_logprobs(logits, tokens))


def test_logprobs_are_nonpositive_and_exp_sums_to_one_over_the_vocabulary(gen):
    logits, _ = make_inputs((10,), torch.float64, gen)
    every = logprobs_from_logits(logits.expand(10, 10), torch.arange(10))
    assert (every <= 0).all()
    assert every.exp().sum().item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_masked_vocabulary_entries_at_minus_inf_are_excluded_with_zero_gradient(dtype, chunk_size, gen, kl_backend):
    kl_backend("eager")
    logits, tokens = make_inputs((6, 12), dtype, gen)
    banned = torch.zeros(6, 12, dtype=torch.bool)
    banned[:, 1::3] = True
    banned[torch.arange(6), tokens] = False  # the sampled token is never banned
    masked = logits.masked_fill(banned, float("-inf"))
    x = masked.clone().requires_grad_()
    out = logprobs_from_logits(x, tokens, temperature=0.8, chunk_size=chunk_size)
    assert torch.isfinite(out).all()
    # truth: a softmax over the allowed entries only
    want = torch.stack(
        [torch.log_softmax(logits[i][~banned[i]].double() / 0.8, -1)[(~banned[i])[: tokens[i]].sum()] for i in range(6)]
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5 if dtype != torch.float64 else 1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[banned] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [1e2, -1e2, 1e4, -1e4])
def test_large_magnitude_logits_are_stable(dtype, offset, gen, kl_backend):
    kl_backend("eager")
    logits, tokens = make_inputs((5, 16), dtype, gen, scale=5.0)
    shifted = logits + offset  # rounded in the input dtype: the truth uses these same values
    x = shifted.clone().requires_grad_()
    out = logprobs_from_logits(x, tokens, chunk_size=2)
    assert torch.isfinite(out).all()
    x64 = shifted.double().requires_grad_()
    want = naive_logprobs(x64, tokens)
    # backward stable: the error is within ~2 ulps of the logits' magnitude in the compute dtype
    atol = 2 * torch.finfo(dtype).eps * abs(offset) + (1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=atol)
    out.sum().backward()
    want.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=atol)


def test_logprobs_of_logits_offset_by_1e4_are_as_accurate_as_a_float32_log_softmax(gen):
    logits, tokens = make_inputs((200, 16), torch.float64, gen, scale=5.0)
    x = (logits + 1e4).float()
    truth = naive_logprobs(x, tokens)
    naive32 = torch.log_softmax(x, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
    out = logprobs_from_logits(x, tokens).double()
    assert (out - truth).abs().max() <= 10 * (naive32 - truth).abs().max() + 1e-6


def test_huge_logit_spread_gives_finite_very_negative_logprobs():
    # a token 1e4 nats below the best one: log-prob ~ -1e4, not -inf or NaN
    logits = torch.tensor([[1e4, 0.0, -1e4]])
    out = logprobs_from_logits(logits, torch.tensor([[2]]).squeeze(0))
    assert out.item() == pytest.approx(-2e4, rel=1e-6)
    out2 = logprobs_from_logits(logits, torch.tensor([0]))
    assert out2.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_is_one_hot_minus_softmax_over_temperature():
    # closed form: d log softmax(z/T)[t] / dz = (onehot(t) - softmax(z/T)) / T
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1])
    logprobs_from_logits(z, t, temperature=2.0).sum().backward()
    p = torch.softmax(z.detach() / 2.0, -1)
    onehot = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(z.grad, (onehot - p) / 2.0, rtol=1e-12, atol=1e-14)


def test_tensor_temperature_is_accepted(gen):
    logits, tokens = make_inputs((3, 8), torch.float64, gen)
    out = logprobs_from_logits(logits, tokens, temperature=torch.tensor(0.5))
    torch.testing.assert_close(out, naive_logprobs(logits, tokens, 0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_peaked_rows_with_one_logit_far_above_the_rest_are_exact(dtype, chunk_size, gen, kl_backend):
    # Confident predictions, sharpened further by a low temperature: one entry per row
    # 50 to 1e4 nats above all the others, anywhere in a large vocabulary, mixed with ordinary rows.
    kl_backend("eager")
    v = 301
    logits, tokens = make_inputs((8, v), torch.float64, gen)
    spikes = {0: (50.0, 0), 1: (87.0, 3), 2: (95.0, 150), 3: (200.0, 299), 4: (300.0, 3), 5: (1e4, 77), 6: (800.0, 5)}
    for row, (height, pos) in spikes.items():
        logits[row, pos] += height
        if row % 2:
            tokens[row] = pos  # the sampled token is the spike half of the time
    logits = logits.to(dtype)
    logits[4, 1::7] = float("-inf")  # and a row with a masked vocabulary
    tokens[4] = 0
    x = logits.clone().requires_grad_()
    out = logprobs_from_logits(x, tokens, temperature=0.25, chunk_size=chunk_size)
    x64 = logits.double().requires_grad_()
    want = naive_logprobs(x64, tokens, 0.25)
    assert torch.isfinite(out).all()
    # tolerance: fp32 rounding of logits of magnitude up to 4e4 after scaling
    atol = 1e-9 if dtype == torch.float64 else 4e4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=atol)
    out.sum().backward()
    want.sum().backward()
    assert torch.isfinite(x.grad).all()
    rtol, g_atol = BWD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=max(g_atol, 4 * atol))
