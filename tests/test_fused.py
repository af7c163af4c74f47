"""Fused LM-head log-probs, entropy and exact KL (klbelt.kl.fused) against float64 references."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from klbelt.kl import _kernels, kl_from_hidden, logprobs_from_hidden

N, H, V = 13, 8, 37  # chunk sizes 1, 4, 5 do not divide 13


def _head(seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(w), cast(b), t


def _reference_logprobs(h, w, b, t, temperature):
    """Plain float64 autograd: materialise the logits, full log-softmax, gather."""
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    return torch.log_softmax(z / temperature, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _grads(out, weights, *params):
    return torch.autograd.grad((out * weights).sum(), [p for p in params if p is not None], retain_graph=True)


@pytest.fixture(params=["eager", pytest.param("compile", marks=pytest.mark.slow)])
def backend(request):
    if request.param == "compile":
        pytest.importorskip("torch._inductor")
    previous = _kernels.get_backend()
    _kernels.set_backend(request.param)
    yield request.param
    _kernels.set_backend(previous)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])
def test_logprobs_from_hidden_values_and_all_three_gradients_match_float64_reference(chunk_size):
    h, w, b, t = _head()
    weights = torch.linspace(-1, 2, N, dtype=torch.float64)
    got = logprobs_from_hidden(h, w, t, bias=b, temperature=0.7, chunk_size=chunk_size)
    want = _reference_logprobs(h, w, b, t, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g_got, g_want in zip(_grads(got, weights, h, w, b), _grads(want, weights, h, w, b)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)


def test_fused_logprobs_match_reference_on_both_kernel_backends(backend):
    h, w, b, t = _head(seed=1, dtype=torch.float32)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(3))
    got = logprobs_from_hidden(h, w, t, bias=b, temperature=1.3, chunk_size=5)
    want = _reference_logprobs(h, w, b, t, 1.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(_grads(got, weights.float(), h, w, b), _grads(want, weights.double(), h, w, b)):
        torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-5)


def test_fused_kl_matches_reference_on_both_kernel_backends(backend):
    h, w, b, _ = _head(seed=5, dtype=torch.float32)
    rh = (h.detach() + 0.3 * torch.randn(N, H, generator=torch.Generator().manual_seed(6))).requires_grad_()
    got = kl_from_hidden(h, w, rh, w.detach(), bias=b, ref_bias=b.detach(), temperature=1.3, chunk_size=5)
    logp = torch.log_softmax((h.double() @ w.double().T + b.double()) / 1.3, -1)
    logq = torch.log_softmax((rh.double() @ w.detach().double().T + b.detach().double()) / 1.3, -1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    ones = torch.ones(N)  # the reference's hidden states require a gradient: both sides of the KL backward kernel
    for a, r in zip(_grads(got, ones, h, w, b, rh), _grads(want, ones.double(), h, w, b, rh)):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-5)


def test_rows_whose_maximum_the_one_pass_shift_misses_are_recomputed_exactly(backend):
    """V=200: the one-pass kernel's shift samples every 3rd column, so a logit of ~1000 at column 1 overflows it."""
    g = torch.Generator().manual_seed(12)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(200, 4, generator=g, dtype=torch.float64)
    h[2] = 0.0
    h[2, 0] = 1000.0
    w[:, 0] = w[:, 0].clamp(-0.5, 0.5)
    w[1, 0] = 1.0  # row 2: z[2, 1] = 1000, every other z[2, v] = 1000 * w[v, 0] <= 500
    t = torch.tensor([0, 5, 1, 7, 199, 3])
    got = logprobs_from_hidden(h.float(), w.float(), t, chunk_size=4)
    want = _reference_logprobs(h.float(), w.float(), None, t, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sub_block_numel", [None, 3 * V])  # 3 * V: 3-row sub-blocks inside 5-row blocks
def test_entropy_is_minus_sum_p_log_p_and_detached(sub_block_numel, monkeypatch):
    if sub_block_numel is not None:
        monkeypatch.setattr(_kernels, "EAGER_CHUNK_NUMEL", sub_block_numel)
    h, w, b, t = _head(seed=2)
    logp, ent = logprobs_from_hidden(h, w, t, bias=b, temperature=0.9, chunk_size=5, with_entropy=True)
    z = (h @ w.T + b) / 0.9
    p = torch.softmax(z, -1)
    torch.testing.assert_close(ent, -(p * torch.log_softmax(z, -1)).sum(-1), rtol=1e-10, atol=1e-10)
    assert not ent.requires_grad and logp.requires_grad


def test_bf16_input_gives_fp32_output_close_to_reference_of_the_rounded_inputs():
    h, w, b, t = _head(seed=4, dtype=torch.bfloat16)
    got = logprobs_from_hidden(h, w, t, bias=b, chunk_size=4)
    assert got.dtype == torch.float32
    want = _reference_logprobs(h, w, b, t, 1.0)
    # the logits themselves are rounded to bf16 (as a bf16 LM head would), so compare loosely
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.15)
    gh, gw, gb = torch.autograd.grad(got.sum(), [h, w, b])
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    rh, rw, rb = torch.autograd.grad(want.sum(), [h, w, b])
    for g_got, g_want in ((gh, rh), (gw, rw), (gb, rb)):
        assert torch.linalg.vector_norm(g_got.double() - g_want) <= 0.05 * torch.linalg.vector_norm(g_want)


def test_tied_embedding_gets_the_sum_of_its_input_and_head_gradients():
    torch.manual_seed(5)
    emb = torch.nn.Embedding(V, H).double()
    ids = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))

    def loss(fused):
        h = torch.tanh(emb(ids) * 1.5)  # the "body": input embedding -> hidden
        if fused:
            return logprobs_from_hidden(h, emb.weight, targets, chunk_size=3).sum()
        return _reference_logprobs(h, emb.weight, None, targets, 1.0).sum()

    (g_fused,) = torch.autograd.grad(loss(True), [emb.weight])
    (g_ref,) = torch.autograd.grad(loss(False), [emb.weight])
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-10)
    # both paths contribute: the head-only gradient differs from the total
    h = torch.tanh(emb(ids) * 1.5).detach()
    (g_head,) = torch.autograd.grad(logprobs_from_hidden(h, emb.weight, targets).sum(), [emb.weight])
    assert not torch.allclose(g_head, g_ref)


def test_blocked_tokens_are_removed_from_the_softmax():
    h, w, b, t = _head(seed=6)
    blocked = torch.tensor([0, 5, 36])
    t = torch.where(torch.isin(t, blocked), 1, t)
    got, ent = logprobs_from_hidden(h, w, t, bias=b, blocked=blocked, chunk_size=4, with_entropy=True)
    z = h @ w.T + b
    z = z.index_fill(-1, blocked, float("-inf"))
    want = torch.log_softmax(z, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(ent, -(p * torch.log_softmax(z, -1)).nan_to_num().sum(-1))
    for a, r in zip(torch.autograd.grad(got.sum(), [h, w, b]), torch.autograd.grad(want.sum(), [h, w, b])):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def _reference_kl(h, w, b, rh, rw, rb, direction, temperature, blocked=None):
    """Plain float64 autograd of the closed form: both logits materialised, nothing detached."""
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    if blocked is not None:  # blocked ids leave both distributions (their logits are -inf)
        keep[blocked] = False

    def logsm(x, m, c):
        z = x.double() @ m.double().T + (0 if c is None else c.double())
        return torch.log_softmax(z[:, keep] / temperature, -1)

    logp, logq = logsm(h, w, b), logsm(rh, rw, rb)
    a, c = (logp, logq) if direction == "reverse" else (logq, logp)
    return (a.exp() * (a - c)).sum(-1)


def _ref_head(seed, size=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rh = torch.randn(N, size, generator=g, dtype=torch.float64)  # the reference may be smaller
    rw = torch.randn(V, size, generator=g, dtype=torch.float64)
    rb = torch.randn(V, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).requires_grad_() for x in (rh, rw, rb))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_kl_from_hidden_is_exact_kl_with_the_gradients_of_both_sides(direction, chunk_size):
    """A reference whose tensors require a gradient gets it, exactly as autograd of the closed form gives it."""
    h, w, b, _ = _head(seed=7)
    rh, rw, rb = _ref_head(8)
    blocked = torch.tensor([0, 5, 36])
    kwargs = dict(bias=b, ref_bias=rb, direction=direction, temperature=0.8, chunk_size=chunk_size, blocked=blocked)
    got = kl_from_hidden(h, w, rh, rw, **kwargs)
    want = _reference_kl(h, w, b, rh, rw, rb, direction, 0.8, blocked)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    params = (h, w, b, rh, rw, rb)
    for a, r in zip(_grads(got, weights, *params), _grads(want, weights, *params)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    assert _grads(want, weights, rh)[0].abs().max() > 1e-3  # the reference's gradient is not trivially 0


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_a_head_weight_shared_by_policy_and_reference_gets_the_total_derivative(direction):
    """One tensor on both sides (e.g. a reference that keeps the policy's lm_head): d/dW of both sides."""
    h, w, b, _ = _head(seed=13)
    rh = (h.detach() + 0.5 * torch.randn(N, H, generator=torch.Generator().manual_seed(14), dtype=torch.float64))
    got = kl_from_hidden(h, w, rh, w, bias=b, direction=direction, temperature=1.2, chunk_size=5)
    want = _reference_kl(h, w, b, rh, w, None, direction, 1.2)
    weights = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    (g_got,), (g_want,) = _grads(got, weights, w), _grads(want, weights, w)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)
    # the control: the policy side alone (reference weight detached) is a different number
    (g_policy,) = _grads(_reference_kl(h, w, b, rh, w.detach(), None, direction, 1.2), weights, w)
    assert (g_policy - g_want).abs().max() > 1e-3


def test_a_frozen_reference_gets_no_gradient_and_no_backward_work(monkeypatch):
    """Tensors that do not require a gradient, or detached ones: no gradient, and the KL backward kernel is
    asked for the policy's side alone (the same work as before the reference could have a gradient)."""
    h, w, b, _ = _head(seed=15)
    rh, rw, rb = _ref_head(16)
    calls = []
    real = _kernels.run
    monkeypatch.setattr(_kernels, "run", lambda name, *a: calls.append((name, a[-2:])) or real(name, *a))
    for direction, policy_arg in (("reverse", 0), ("forward", 1)):
        for ref in ((rh.detach(), rw.detach(), rb.detach()), tuple(x.detach().clone() for x in (rh, rw, rb))):
            calls.clear()
            out = kl_from_hidden(h, w, *ref[:2], bias=b, ref_bias=ref[2], direction=direction, chunk_size=4)
            out.sum().backward()
            needs = [flags for name, flags in calls if name == "kl_bwd"]
            want = (True, False) if policy_arg == 0 else (False, True)
            assert needs and all(flags == want for flags in needs), needs
            assert all(x.grad is None for x in (rh, rw, rb) + ref)
    with torch.no_grad():  # no graph at all
        assert not kl_from_hidden(h, w, rh, rw).requires_grad


def test_kl_from_hidden_of_identical_heads_is_zero():
    h, w, b, _ = _head(seed=9, dtype=torch.float32)
    kl = kl_from_hidden(h, w, h, w, bias=b, ref_bias=b)
    assert kl.abs().max() < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"hidden": torch.zeros(3, 5)}, ValueError, ["hidden", "(3, 5)", "hidden size 8"]),
        ({"tokens": torch.tensor([0, 37, 1])}, ValueError, ["tokens", "[0, 37)"]),
        ({"weight": torch.zeros(V, H, dtype=torch.float64)}, ValueError, ["weight", "hidden", "float64", "float32"]),
        ({"chunk_size": 0}, ValueError, ["chunk_size", "got 0"]),
        ({"tokens": torch.zeros(4, dtype=torch.long)}, ValueError, ["tokens", "(3,)", "(4,)"]),
        ({"bias": torch.zeros(5)}, ValueError, ["bias", f"({V},)", "(5,)"]),
        ({"weight": torch.zeros(V)}, ValueError, ["weight", "[V, H]"]),
        ({"weight": torch.zeros(V, H, device="meta")}, ValueError, ["weight", "hidden", "meta", "cpu"]),
        ({"chunk_size": -3}, ValueError, ["chunk_size", "-3"]),
    ],
)
def test_bad_input_names_the_argument_what_it_got_and_what_was_expected(kwargs, exc, words):
    args = {"hidden": torch.zeros(3, H), "weight": torch.zeros(V, H), "tokens": torch.tensor([0, 1, 2])}
    extra = {k: kwargs.pop(k) for k in ("chunk_size", "bias") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(exc) as info:
        logprobs_from_hidden(args["hidden"], args["weight"], args["tokens"], **extra)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ref_weight": torch.zeros(V + 1, H)}, ["ref_weight", f"{V} rows", f"({V + 1}, {H})"]),
        ({"ref_hidden": torch.zeros(4, H)}, ["ref_hidden", "(3,)", "(4,)"]),
        ({"ref_hidden": torch.zeros(3, H + 1)}, ["ref_hidden", f"hidden size {H}", f"(3, {H + 1})", "ref_weight"]),
        ({"direction": "sideways"}, ["direction", "sideways"]),
        ({"chunk_size": 0}, ["chunk_size", "got 0"]),
        ({"weight": torch.zeros(V, H, dtype=torch.float64)}, ["weight", "hidden", "float64", "float32"]),
    ],
)
def test_kl_from_hidden_bad_input_names_the_argument_what_it_got_and_what_was_expected(kwargs, words):
    args = {"hidden": torch.zeros(3, H), "weight": torch.zeros(V, H), "ref_hidden": torch.zeros(3, H),
            "ref_weight": torch.zeros(V, H)}
    extra = {k: kwargs.pop(k) for k in ("chunk_size", "direction") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        kl_from_hidden(args["hidden"], args["weight"], args["ref_hidden"], args["ref_weight"], **extra)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_no_rows_times_vocab_tensor_is_kept_for_the_backward():
    """Run in a child process so the allocator's peak is this computation's own."""
    code = textwrap.dedent(
        """
        import torch
        from klbelt.kl import logprobs_from_hidden, kl_from_hidden
        n, h, v = 512, 16, 4096
        logits_bytes = n * v * 4
        x = torch.randn(n, h, requires_grad=True)
        w = torch.randn(v, h, requires_grad=True)
        t = torch.randint(0, v, (n,))
        out = logprobs_from_hidden(x, w, t, chunk_size=64)
        kl = kl_from_hidden(x, w, x.detach() * 0.9, w.detach(), chunk_size=64)
        saved = []
        def walk(fn, seen):
            if fn is None or fn in seen:
                return
            seen.add(fn)
            for name in dir(fn):
                if name.startswith("_saved_") or name == "saved_tensors":
                    try:
                        val = getattr(fn, name)
                    except Exception:
                        continue
                    vals = val if isinstance(val, tuple) else (val,)
                    saved.extend(x for x in vals if isinstance(x, torch.Tensor))
            for nxt, _ in fn.next_functions:
                walk(nxt, seen)
        seen = set()
        walk(out.grad_fn, seen)
        walk(kl.grad_fn, seen)
        biggest = max(s.numel() * s.element_size() for s in saved)
        assert saved and biggest <= w.numel() * 4, (biggest, logits_bytes)
        print("biggest saved", biggest, "logits", logits_bytes)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "biggest saved" in result.stdout


@pytest.mark.slow
def test_default_blocks_keep_the_extra_peak_of_forward_and_backward_under_an_eighth_of_the_logits():
    """Resident-memory peak of one call (klbelt.bench._memory), in a child process.

    The control: the same measurement sees the matmul + kernel path hold at
    least the full fp32 logits, so a fused path that kept them would fail.
    """
    code = textwrap.dedent(
        """
        import torch
        from klbelt.bench import _memory
        from klbelt.kl import kl_from_hidden, kl_from_logits, logprobs_from_hidden, logprobs_from_logits
        torch.manual_seed(0)
        n, h, v = 2048, 32, 16384
        x = torch.randn(n, h, requires_grad=True)
        w = torch.randn(v, h, requires_grad=True)
        rx, t = x.detach() * 0.9, torch.randint(0, v, (n,))
        calls = {
            "fused_logprobs": lambda: logprobs_from_hidden(x, w, t),
            "fused_kl": lambda: kl_from_hidden(x, w, rx, w.detach()),
            "unfused_logprobs": lambda: logprobs_from_logits(x @ w.T, t),
        }
        for name, fn in calls.items():
            def call(fn=fn):
                out = fn()
                return (out.detach(), *torch.autograd.grad(out.sum(), [x, w]))
            print(name, _memory.extra_peak_bytes(call) / (n * v * 4))
        """
    )
    from klbelt.bench._memory import CHILD_ENV, peak_is_resettable

    if not peak_is_resettable():
        pytest.skip("the resident-memory peak cannot be reset on this system")
    env = {**__import__("os").environ, **CHILD_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    ratio = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()}
    assert ratio["unfused_logprobs"] >= 1.0, ratio
    assert ratio["fused_logprobs"] <= 1 / 8 and ratio["fused_kl"] <= 1 / 8, ratio


def _rollout(vocab, blocked=()):
    from klbelt.rl.rollout import Rollout

    g = torch.Generator().manual_seed(11)
    seqs = torch.randint(0, vocab - 2, (3, 9), generator=g)
    attn = torch.ones_like(seqs)
    attn[0, :2] = 0  # left padding
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    return Rollout(seqs, attn, 4, mask, torch.zeros(3, 5), tuple(blocked))


def _logits_path(model, roll, temperature):
    from klbelt.rl.rollout import entropy_from_logits, response_logits
    from klbelt.kl import logprobs_from_logits

    logits = response_logits(model, roll).double()
    lp = logprobs_from_logits(logits, roll.responses, temperature=temperature) * roll.response_mask
    return lp, entropy_from_logits(logits, temperature) * roll.response_mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_response_logprobs_of_hf_models_use_the_fused_head_and_match_the_logits_path(arch, recwarn):
    from klbelt.rl import rollout as rl

    vocab = 23
    if arch == "gpt2":
        from tiny_models import tiny_gpt2

        model = tiny_gpt2(vocab, n_layer=2)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
        )).eval()
    roll = _rollout(vocab, blocked=(vocab - 1,))
    assert rl.fused_head(model) is model.get_output_embeddings()
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: calls.append(o.shape))
    lp, ent = rl.response_logprobs(model, roll, 0.8, with_entropy=True)
    handle.remove()
    assert all(shape[-2] == 1 for shape in calls), calls  # the head itself never ran on the response
    want_lp, want_ent = _logits_path(model, roll, 0.8)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent.double(), rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got_g = torch.autograd.grad(lp.sum(), params, allow_unused=True)
    logits = rl.response_logits(model, roll)
    from klbelt.kl import logprobs_from_logits

    ref = (logprobs_from_logits(logits, roll.responses, temperature=0.8) * roll.response_mask).sum()
    want_g = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(got_g, want_g):
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not [w for w in recwarn if "full [B, R, V] logits" in str(w.message)]


def test_models_that_scale_logits_after_the_head_fall_back_to_logits_with_one_warning():
    from tiny_models import tiny_gpt2

    from klbelt.rl import rollout as rl

    model = tiny_gpt2(23)
    model.config.final_logit_softcapping = 30.0
    roll = _rollout(23)
    with pytest.warns(RuntimeWarning, match="final_logit_softcapping"):
        assert rl.fused_head(model) is None
    lp = rl.response_logprobs(model, roll)
    torch.testing.assert_close(lp.double(), _logits_path(model, roll, 1.0)[0], rtol=1e-6, atol=1e-6)


def _bf16_rounding_stats(got, want, bound):
    """(share of entries equal to ``want`` rounded to bf16, largest error beyond one bf16 spacing of ``want``
    in units of ``bound``: ``|dL/dz|^T |h|``, the sum the error of dL/dz entries rounded the other way is
    proportional to)."""
    same = (got.double() == want.bfloat16().double()).double().mean().item()
    spacing = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    excess = ((got.double() - want).abs() - spacing).clamp_min(0)
    return same, (excess / bound.clamp_min(1e-30)).max().item()


def _bf16_logits(h, w, b, blocked=None):
    """The torch path's bf16 logits in float64 (the bf16 matmul rounds its fp32 sums once)."""
    z = (h.double() @ w.double().T + (0 if b is None else b.double())).bfloat16().double()
    if blocked is not None:
        z[:, blocked] = float("-inf")
    return z


def _bf16_case(seed, n=256, h_size=32, vocab=300):
    g = torch.Generator().manual_seed(seed)
    h, w, rh = (torch.randn(*shape, generator=g).bfloat16() for shape in ((n, h_size), (vocab, h_size), (n, h_size)))
    b = torch.randn(vocab, generator=g).bfloat16()
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, rh, t, torch.randn(n, generator=g)


def test_bf16_head_weight_and_bias_gradients_over_many_row_blocks_are_rounded_once(backend):
    """16 row blocks: the fp32 sums over all rows rounded to bf16 once, as the unfused path rounds them.

    The reference: float64 dL/dz from the bf16 logits, rounded to bf16 (as the kernels round it), summed
    in float64; the gradient must be that rounded to bf16 in all but 1% of entries. The others may be
    off by one bf16 spacing plus what dL/dz entries on a rounding boundary, rounded the other way in the
    kernel's fp32 (compiled kernels round differently), can add: 2^-8 of |dL/dz|^T |h| each. The
    control: adding the blocks' bf16 products one after another, as this path did before, gets only
    about half the entries right.
    """
    h, w, b, _, t, g = _bf16_case(31)
    hg, wg, bg = (x.clone().requires_grad_() for x in (h, w, b))
    _, gw, gb = torch.autograd.grad(logprobs_from_hidden(hg, wg, t, bias=bg, chunk_size=16), [hg, wg, bg], g)
    p = torch.softmax(_bf16_logits(h, w, b), -1)
    gz = (g.double()[:, None] * (torch.nn.functional.one_hot(t, w.shape[0]).double() - p)).bfloat16().double()
    want_w, want_b = gz.T @ h.double(), gz.sum(0)
    bound_w, bound_b = gz.abs().T @ h.double().abs(), gz.abs().sum(0)
    for got, want, bound in ((gw, want_w, bound_w), (gb, want_b, bound_b)):
        same, worst = _bf16_rounding_stats(got, want, bound)
        assert got.dtype == torch.bfloat16 and same >= 0.99 and worst <= 2**-8, (same, worst)
    old_w = torch.zeros_like(w)
    for s in range(0, h.shape[0], 16):
        old_w.addmm_(gz[s : s + 16].bfloat16().T, h[s : s + 16])
    same, _ = _bf16_rounding_stats(old_w, want_w, bound_w)
    assert same < 0.9, same


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("shared", [True, False])
def test_bf16_kl_head_weight_gradients_over_many_row_blocks_are_rounded_once(direction, shared, backend):
    """Both sides' weights (one tensor when ``shared``: the total derivative), blocked tokens, 16 row blocks."""
    h, w, b, rh, _, g = _bf16_case(32)
    rw = w if shared else (w.float() + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))).bfloat16()
    blocked = torch.tensor([0, 7, 299])
    wg = w.clone().requires_grad_()
    rwg = wg if shared else rw.clone().requires_grad_()
    params = [wg] if shared else [wg, rwg]
    got = torch.autograd.grad(kl_from_hidden(h, wg, rh, rwg, bias=b, ref_bias=b, direction=direction,
                                             blocked=blocked, chunk_size=16), params, g)
    zp, zr = _bf16_logits(h, w, b, blocked), _bf16_logits(rh, rw, b, blocked)
    za, zb = (zp, zr) if direction == "reverse" else (zr, zp)
    logp, logq = torch.log_softmax(za, -1), torch.log_softmax(zb, -1)
    p, q = logp.exp(), logq.exp()
    kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1, keepdim=True)
    ga = (g.double()[:, None] * torch.where(p > 0, p * (logp - logq - kl), 0.0)).bfloat16().double()
    gb = (g.double()[:, None] * (q - p)).bfloat16().double()
    gzp, gzr = (ga, gb) if direction == "reverse" else (gb, ga)
    hd, rhd = h.double(), rh.double()
    wants = [gzp.T @ hd + gzr.T @ rhd] if shared else [gzp.T @ hd, gzr.T @ rhd]
    bounds = ([gzp.abs().T @ hd.abs() + gzr.abs().T @ rhd.abs()] if shared
              else [gzp.abs().T @ hd.abs(), gzr.abs().T @ rhd.abs()])
    for x, want, bound in zip(got, wants, bounds):
        same, worst = _bf16_rounding_stats(x, want, bound)  # as in the log-prob test above
        assert same >= 0.99 and worst <= 2**-8, (same, worst)
        assert (x[blocked] == 0).all()
