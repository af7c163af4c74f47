"""Sampler "bf16-merged" (a synced low-precision copy of the policy), PPO's single pass giving pi's
log-probs, the reference scored in the trained numerics, and contiguous ``logits_to_keep``."""

from __future__ import annotations

import copy

import pytest
import torch

import klbelt.rl.update as update
from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import adapters_disabled, apply_lora, bf16_supported, hold_base_in_bf16, restore_fp32
from klbelt.rl.merged_sampler import CastEmbedding, MergedCopySampler, PackedLinear, packing_available
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.samplers import make_sampler
from klbelt.rl.trainer import train
from klbelt.rl.run_state import fingerprint
from tiny_models import tiny_gpt2, tiny_llama, word_tokenizer

WORDS = ["a", "b", "c", "d"] + [f"w{i}" for i in range(40)]
KW = dict(max_new_tokens=8, temperature=1.0)


def _prompts(tok):
    enc = tok(["a b", "c", "w1 w2 w3", "d"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _move_adapters(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lora", [True, False])
def test_an_fp32_copy_samples_what_the_policy_samples_and_follows_it_after_updates(lora):
    tok = word_tokenizer(WORDS)
    policy = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=5)
    if lora:
        policy = apply_lora(policy, 4)
    ids, mask = _prompts(tok)
    copier = MergedCopySampler(torch.float32)
    for update_no in range(3):  # the copy is built, then rewritten after each "update"
        _move_adapters(policy, update_no)
        uniforms = torch.rand(4, KW["max_new_tokens"], generator=torch.Generator().manual_seed(update_no))
        want = sample(policy, ids, mask, uniforms=uniforms, **KW)
        got = copier(policy, ids, mask, uniforms=uniforms, **KW)
        assert torch.equal(got.sequences, want.sequences), update_no
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=2e-5, rtol=0)
    # the copy is plain weights: no adapters, tied embeddings still tied, nothing trainable
    names = [n for n, _ in copier.copy.named_parameters()]
    assert not any("lora" in n for n in names)
    assert copier.copy.get_output_embeddings().weight is copier.copy.get_input_embeddings().weight
    assert not any(p.requires_grad for p in copier.copy.parameters())


def test_the_bf16_copy_is_bf16_and_a_small_real_mismatch():
    tok = word_tokenizer(WORDS)
    policy = apply_lora(tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=5), 4)
    _move_adapters(policy, 0)
    ids, mask = _prompts(tok)
    draw = make_sampler("bf16-merged")
    roll = draw(policy, ids, mask, generator=torch.Generator().manual_seed(0), **KW)
    assert {p.dtype for p in draw.copy.parameters()} == {torch.bfloat16}
    delta = (response_logprobs(policy, roll).detach() - roll.logprobs)[roll.response_mask > 0]
    assert 0 < float(delta.abs().max()) < 0.2  # bf16 weights: rounding, not another model
    draw.close()
    assert draw.copy is None


def test_the_copy_never_touches_the_trained_weights():
    tok = word_tokenizer(WORDS)
    policy = apply_lora(tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=2), 4)
    _move_adapters(policy, 1)
    before = copy.deepcopy(policy.state_dict())
    ids, mask = _prompts(tok)
    MergedCopySampler()(policy, ids, mask, generator=torch.Generator().manual_seed(0), **KW)
    after = policy.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _train(tmp_path, name, **over):
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=32, seed=1)
    cfg = TrainConfig(steps=3, batch_size=8, group_size=2, advantage="group", max_new_tokens=6, ppo_epochs=1,
                      minibatches=1, checkpoint_every=100, out=str(tmp_path / name), **over)
    return train(cfg, model, tok, ["a b", "c d", "w1", "w2 w3"], lambda texts: torch.tensor([float(len(t)) for t in texts]),
                 warn_alerts=False)


@pytest.mark.parametrize("correction", ["off", "tis"])
def test_the_single_pass_gives_the_metrics_of_a_separate_recompute(tmp_path, monkeypatch, correction):
    over = dict(sampler="bf16", rollout_correction=correction, lora_rank=4)
    single = _train(tmp_path, "single", **over)
    monkeypatch.setattr(update, "single_pass", lambda cfg, correction: False)  # the no-grad recompute path
    separate = _train(tmp_path, "separate", **over)
    assert len(single) == len(separate) == 3
    for a, b in zip(single, separate):
        for key in ("kl", "kl_k3", "reward_mean", "pg_loss", "clip_frac", "mismatch_k3", "mismatch_max_logratio",
                    "is_weight_mean", "entropy", "kl_coef"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
def test_a_policy_equal_to_its_reference_reads_kl_zero_in_bf16(tmp_path):
    # LoRA starts with B = 0: the policy is the reference. Scored in the same (bf16) numerics on both
    # sides, the first update's KL is exactly 0, although mu (the bf16 copy) differs from pi.
    history = _train(tmp_path, "zero", sampler="bf16-merged", lora_rank=4, bf16=True)
    first = history[0]
    assert first["kl"] == 0.0 and first["kl_k3"] == 0.0
    assert first["mismatch_max_logratio"] > 0


def test_response_logprobs_equal_the_plain_full_forward():
    # logits_to_keep goes to Hugging Face as an index tensor now; the result must be the model's own logits
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=7)
    ids, mask = _prompts(tok)
    roll = sample(model, ids, mask, generator=torch.Generator().manual_seed(1), **KW)
    P = roll.prompt_len
    with torch.no_grad():
        logits = model(input_ids=roll.sequences, attention_mask=roll.attention_mask,
                       position_ids=(roll.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, P - 1 : -1]
        want = torch.log_softmax(logits.double(), -1).gather(-1, roll.responses[..., None]).squeeze(-1) * roll.response_mask
        got = response_logprobs(model, roll)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(roll.logprobs.double(), want, atol=1e-5, rtol=0)


def test_bf16_merged_is_a_known_sampler_and_a_typo_is_refused():
    assert TrainConfig(sampler="bf16-merged").sampler == "bf16-merged"
    with pytest.raises(ValueError, match="sampler"):
        TrainConfig(sampler="bf16_merged")


def test_train_leaves_the_fused_head_setting_as_it_found_it(tmp_path):
    from klbelt.rl.rollout import set_fused_head

    before = set_fused_head(True)
    try:
        _train(tmp_path, "unfused", fused_head=False)
        assert set_fused_head(True) is True  # the run's False did not outlive it
    finally:
        set_fused_head(before)


needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
needs_packing = pytest.mark.skipif(not packing_available(), reason="no oneDNN bf16 weight packing here")


def _lora_llama(tok, seed=3, bias=False):
    policy = apply_lora(tiny_llama(len(tok), seed=seed, bias=bias), 4)
    _move_adapters(policy, seed)
    return policy


def _logprobs_and_grads(policy, roll):
    policy.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = response_logprobs(policy, roll)
        with torch.no_grad(), adapters_disabled(policy) as base:
            ref = response_logprobs(base, roll)
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return lp.detach(), ref, grads


@needs_bf16
def test_bf16_base_changes_no_number_under_autocast():
    """The held weights are the bf16 values autocast casts to: policy and reference log-probs and the
    adapters' gradients are equal bit for bit, while the base's linear weights really are bf16."""
    tok = word_tokenizer(WORDS)
    policy = _lora_llama(tok)
    ids, mask = _prompts(tok)
    roll = sample(policy, ids, mask, generator=torch.Generator().manual_seed(0), **KW)
    before = _logprobs_and_grads(policy, roll)
    held = hold_base_in_bf16(policy)
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert len(held) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if ".base_layer." in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if ".base_layer." not in n)  # adapters, norms, embedding
    after = _logprobs_and_grads(policy, roll)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2].keys() == after[2].keys() and before[2]
    assert all(torch.equal(before[2][n], after[2][n]) for n in before[2])
    restore_fp32(held)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


@needs_bf16
def test_a_bf16_base_run_matches_the_fp32_base_run_and_hands_back_fp32(tmp_path):
    tok = word_tokenizer(WORDS)
    seen = {}

    def run(bf16_base):
        policy = apply_lora(tiny_llama(len(tok), seed=4), 4)
        cfg = TrainConfig(steps=2, batch_size=8, group_size=2, advantage="group", max_new_tokens=6, lora_rank=4, bf16=True,
                          sampler="bf16-merged", bf16_base=bf16_base, checkpoint_every=100, out=str(tmp_path / f"run{bf16_base}"))

        def on_step(record):
            seen.setdefault(bf16_base, {n: p.dtype for n, p in policy.named_parameters()})

        history = train(cfg, policy, tok, ["a b", "c d", "w1", "w2 w3"], lambda texts: torch.tensor([float(len(t)) for t in texts]),
                        on_step=on_step, warn_alerts=False)
        return policy, history

    policy, held_run = run(True)
    _, plain_run = run(False)
    # update 0 (adapters at zero) is the same arithmetic: every metric equal but the clock
    assert {k: v for k, v in held_run[0].items() if k != "seconds"} == {k: v for k, v in plain_run[0].items() if k != "seconds"}
    assert {d for n, d in seen[True].items() if ".base_layer." in n} == {torch.bfloat16}
    assert {d for n, d in seen[False].items()} == {torch.float32}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # fp32 again when the run ends


def test_bf16_base_with_the_policy_sampler_is_refused():
    with pytest.raises(ValueError, match="bf16_base needs a sampler other than 'policy'"):
        TrainConfig(lora_rank=4, bf16=True, bf16_base=True)
    with pytest.raises(ValueError, match="bf16_base must be true or false"):
        TrainConfig(bf16_base="yes", sampler="bf16-merged")


@needs_packing
@pytest.mark.parametrize("rows", [1, 4, 16, 40])
def test_a_packed_linear_equals_f_linear_bit_for_bit(rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    layer = PackedLinear(weight, bias, rows_hint=16)
    for shape in ((rows, 32), (2, rows, 32)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias))
    new = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    layer.pack(new)
    layer.set_bias(torch.zeros(48))
    x = torch.randn(rows, 32, generator=g).to(torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, new))
    with pytest.raises(ValueError, match="weight must be"):
        layer.pack(torch.zeros(32, 48))


@needs_packing
@pytest.mark.parametrize("lora", [True, False])
def test_the_packed_copy_samples_exactly_what_the_plain_bf16_copy_samples(lora):
    tok = word_tokenizer(WORDS)
    policy = tiny_llama(len(tok), seed=6, bias=True)  # biases: a full fine-tune moves them too
    if lora:
        policy = apply_lora(policy, 4)
    ids, mask = _prompts(tok)
    packed, plain = MergedCopySampler(pack=True), MergedCopySampler(pack=False)
    for update_no in range(3):
        _move_adapters(policy, update_no)
        uniforms = torch.rand(4, KW["max_new_tokens"], generator=torch.Generator().manual_seed(update_no))
        got = packed(policy, ids, mask, uniforms=uniforms, **KW)
        want = plain(policy, ids, mask, uniforms=uniforms, **KW)
        assert torch.equal(got.sequences, want.sequences), update_no
        assert torch.equal(got.logprobs, want.logprobs), update_no
    layers = [m for m in packed.copy.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2 * 7 + 1  # every projection and the LM head
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.copy.modules())
    # between rollouts the weights the next sync rewrites are released; under LoRA the embedding
    # (frozen) is read from the policy's own table, not copied
    embed = packed.copy.get_input_embeddings()
    if lora:
        assert all(m.packed is None for m in layers[:-1]) and layers[-1].packed is not None
        assert isinstance(embed, CastEmbedding) and not list(embed.parameters())
    else:
        assert all(m.packed is None for m in layers)
        assert embed.weight.dtype == torch.bfloat16


def test_the_reference_fingerprint_is_the_sum_it_always_was():
    """Summed one tensor at a time now; the numbers equal the all-at-once formula (old checkpoints resume)."""
    model = tiny_gpt2(50, n_layer=2, n_embd=16, seed=9)
    flat = [p.detach().double().reshape(-1) for p in model.parameters()]
    want = [float(sum(f.sum() for f in flat)), float(sum(f.square().sum() for f in flat))]
    assert fingerprint(model) == want
    assert fingerprint(list(model.parameters())) == want


@pytest.mark.parametrize("bf16_base", [False, True])
def test_merged_weights_are_the_base_plus_peft_deltas_in_fp32_bit_for_bit(bf16_base):
    """The sync sums in place; the numbers are those of ``W.float() + sum(get_delta_weight)`` exactly."""
    from klbelt.rl.merged_sampler import merged_tensors

    tok = word_tokenizer(WORDS)
    policy = _lora_llama(tok, seed=6, bias=True)
    if bf16_base:
        hold_base_in_bf16(policy)
    layers = {n: m for n, m in policy.get_base_model().named_modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    checked = 0
    for name, tensor in merged_tensors(policy):
        layer = layers.get(name[: -len(".weight")])
        if layer is not None and name.endswith(".weight"):
            expected = layer.base_layer.weight.float() + sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected), name
            checked += 1
    assert checked == len(layers) > 0
