"""klbelt_fp32 attention (``TrainConfig.attn_implementation``) against torch's SDPA, in float64 and under bf16 autocast."""

from __future__ import annotations

import types

import pytest
import torch

import klbelt.rl.attention as attention
from klbelt.rl.attention import fp32_attention, set_attention
from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import apply_lora, bf16_supported
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.trainer import train
from tiny_models import tiny_llama, word_tokenizer

WORDS = ["a", "b", "c", "d"] + [f"w{i}" for i in range(40)]
PROMPTS = ["a b", "c d", "w1", "w2 w3"]


def _batch(tok):
    enc = tok(["a b w4 w5", "c", "w1 w2 w3", "d w9"], return_tensors="pt", padding=True)  # left padding of 0-3
    return enc["input_ids"], enc["attention_mask"]


def _model(tok, impl, dtype=torch.float64, heads=(4, 2)):
    model = tiny_llama(len(tok), seed=5, n_layer=2, hidden=32)
    model.config.num_attention_heads, model.config.num_key_value_heads = heads
    model = type(model)(model.config).eval()  # rebuilt with 4 query heads over 2 key/value heads
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    set_attention(model, impl)
    return model.to(dtype)


def _logits(model, ids, mask):
    from klbelt.rl.rollout import position_ids

    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits


def test_in_float64_the_logits_and_gradients_are_torchs_sdpa():
    """Left padding, grouped query heads, every position: the same function as torch's fused kernel."""
    tok = word_tokenizer(WORDS)
    ids, mask = _batch(tok)
    results = {}
    for impl in ("sdpa", "klbelt_fp32"):
        model = _model(tok, impl)
        assert model.config._attn_implementation == impl
        logits = _logits(model, ids, mask)
        (logits * mask[..., None]).square().sum().backward()
        results[impl] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    (a, grads_a), (b, grads_b) = results["sdpa"], results["klbelt_fp32"]
    real = mask.bool()
    assert torch.allclose(a[real], b[real], rtol=0, atol=1e-12)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=0, atol=1e-10), name


def test_the_cached_decode_gives_the_full_passes_log_probs():
    """The KV-cached sampling loop (one query against the cache, the mask's offset) scores each token as
    a full forward over the finished sequence does."""
    tok = word_tokenizer(WORDS)
    ids, mask = _batch(tok)
    model = _model(tok, "klbelt_fp32")
    calls = []
    spy = attention.fp32_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return spy(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("klbelt_fp32", counted)
    try:
        roll = sample(model, ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(0), stop_on_eos=False)
        full = response_logprobs(model, roll)
    finally:
        attention.register()
    assert calls.count(1) == 2 * 5  # 2 layers x 5 one-token steps went through it
    assert torch.allclose(roll.logprobs.double(), full, rtol=0, atol=1e-6)


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
def test_under_bf16_autocast_it_computes_in_fp32():
    """bf16 queries, keys and values as autocast hands them over; the result is the float64 attention of those
    bf16 values rounded once to bf16 (autocast would have run both matmuls in bf16, and Hugging Face's eager
    path rounds the probabilities to bf16)."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, L, D = 3, 4, 2, 7, 16
    q, k, v = (torch.randn(B, n, L, D, generator=g).bfloat16() for n in (H, KV, KV))
    mask = torch.zeros(B, 1, L, L)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # row 0: two padded keys
    mask += torch.triu(torch.full((L, L), torch.finfo(torch.float32).min), 1)
    layer = types.SimpleNamespace(num_key_value_groups=H // KV, training=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = fp32_attention(layer, q, k, v, mask, scaling=D ** -0.5)
    kk, vv = (t.double().repeat_interleave(H // KV, dim=1) for t in (k, v))
    truth_p = torch.softmax(q.double() @ kk.transpose(-1, -2) * D ** -0.5 + mask.double(), dim=-1)
    truth = (truth_p @ vv).transpose(1, 2)
    assert probs.dtype == torch.float32 and out.dtype == torch.bfloat16 and out.shape == (B, L, H, D)
    assert (probs.double() - truth_p).abs().max() < 1e-6
    assert ((out.double() - truth).abs() <= 2 ** -8 * truth.abs() + 1e-30).all()  # within one bf16 rounding
    assert (out != truth.bfloat16()).float().mean() < 0.01  # and the once-rounded value almost everywhere


def test_train_uses_it_in_every_pass_and_gives_the_model_back_as_it_was(tmp_path):
    tok = word_tokenizer(WORDS)
    policy = apply_lora(tiny_llama(len(tok), seed=4), 4)
    assert policy.get_base_model().config._attn_implementation == "sdpa"
    lengths = []
    original = attention.fp32_attention

    def counted(*args, **kwargs):
        lengths.append(args[1].shape[2])
        return original(*args, **kwargs)

    attention.fp32_attention = counted  # registered (by set_attention) as this
    try:
        cfg = TrainConfig(steps=2, batch_size=8, group_size=2, advantage="group", max_new_tokens=4, lora_rank=4, bf16=bf16_supported(),
                          sampler="bf16-merged", attn_implementation="klbelt_fp32", checkpoint_every=100, out=str(tmp_path / "run"))
        train(cfg, policy, tok, PROMPTS, lambda texts: torch.tensor([float(len(t)) for t in texts]), warn_alerts=False)
    finally:
        attention.fp32_attention = original
        attention.register()
    assert 1 in lengths  # the sampler copy's decode steps
    assert lengths.count(max(lengths)) >= 2 * 2 * 2  # 2 layers x (reference + policy) x 2 updates, full length
    assert policy.get_base_model().config._attn_implementation == "sdpa"  # the run's choice did not outlive it


def test_a_bad_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="attn_implementation must be one of .*'klbelt_fp32'.*got 'flash'"):
        TrainConfig(attn_implementation="flash")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        set_attention(torch.nn.Linear(2, 2), "fast")
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        set_attention(torch.nn.Linear(2, 2), "klbelt_fp32")


def test_a_soft_capped_model_is_refused_not_computed_wrong():
    q = torch.zeros(1, 2, 3, 4)
    layer = types.SimpleNamespace(num_key_value_groups=1, training=False)
    with pytest.raises(ValueError, match="does not implement 'softcap'"):
        fp32_attention(layer, q, q, q, None, scaling=0.5, softcap=30.0)


def test_model_leaves_the_model_alone():
    tok = word_tokenizer(WORDS)
    model = tiny_llama(len(tok))
    assert set_attention(model, "model") == "sdpa" and model.config._attn_implementation == "sdpa"
    assert set_attention(model, "eager") == "sdpa" and model.config._attn_implementation == "eager"



# --- klbelt's decode loop (LeanDecoder) over the sampler copy ------------------------------------------------------


def _moved_lora_llama(tok, bias: bool):
    policy = apply_lora(tiny_llama(len(tok), seed=3, bias=bias), 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    set_attention(policy, "klbelt_fp32")
    return policy


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not bf16_supported(), reason="this CPU has no native bf16"))])
@pytest.mark.parametrize("bias", [False, True])
def test_the_lean_decode_loop_samples_exactly_what_hugging_faces_loop_samples(dtype, bias):
    """Same tokens, same log-probs bit for bit, over two weight syncs, with EOS stops and a blocked token."""
    from klbelt.rl.merged_sampler import MergedCopySampler

    tok = word_tokenizer(WORDS)
    policy = _moved_lora_llama(tok, bias)
    ids, mask = _batch(tok)
    samplers = {lean: MergedCopySampler(dtype, lean=lean) for lean in (False, True)}
    for sync in range(2):
        rolls = {}
        for lean, sampler in samplers.items():
            rolls[lean] = sampler(policy, ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(sync),
                                  eos_token_id=tok.eos_token_id, stop_on_eos=True, blocked_token_ids=(tok.convert_tokens_to_ids("w7"),))
        assert samplers[True].decoder is not None and samplers[False].decoder is None
        a, b = rolls[False], rolls[True]
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
        assert torch.equal(a.logprobs, b.logprobs)
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.mul_(1.5)  # the next sync has something to carry


def test_the_lean_decode_loop_is_used_only_where_it_is_exact():
    from klbelt.rl.lean_decode import LeanDecoder, unsupported
    from klbelt.rl.merged_sampler import MergedCopySampler
    from tiny_models import tiny_gpt2

    tok = word_tokenizer(WORDS)
    ids, mask = _batch(tok)
    llama = tiny_llama(len(tok))
    assert "not 'klbelt_fp32'" in unsupported(llama)  # SDPA: Hugging Face's loop, as before
    set_attention(llama, "klbelt_fp32")
    assert unsupported(llama) is None
    gpt2 = tiny_gpt2(len(tok))
    set_attention(gpt2, "klbelt_fp32")
    assert "model_type 'gpt2'" in unsupported(gpt2)
    with pytest.raises(ValueError, match="LeanDecoder cannot run GPT2LMHeadModel: model_type 'gpt2'"):
        LeanDecoder(gpt2)
    with pytest.raises(ValueError, match="lean=True: klbelt's decode loop cannot run GPT2LMHeadModel"):
        MergedCopySampler(torch.float32, lean=True)(gpt2, ids, mask, max_new_tokens=2)
    sampler = MergedCopySampler(torch.float32)
    sampler(gpt2, ids, mask, max_new_tokens=2)
    assert sampler.decoder is None  # GPT-2 samples through Hugging Face
    decoder = LeanDecoder(llama)
    decoder.reserve(1)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=ids * 0, cache=None, logits_to_keep=1)
    step = dict(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), position_ids=ids[:, :1] * 0)
    out = decoder(**step, cache=out["cache"])
    with pytest.raises(ValueError, match="6 positions exceed the 5 reserved"):
        decoder(**{**step, "attention_mask": torch.cat([mask, mask[:, :2]], 1)}, cache=out["cache"])
