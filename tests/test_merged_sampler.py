"""Sampler "bf16-merged" (a synced low-precision copy of the policy), PPO's single pass giving pi's
log-probs, the reference scored in the trained numerics, and contiguous ``logits_to_keep``."""

from __future__ import annotations

import copy

import pytest
import torch

import klbelt.rl.update as update
from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import apply_lora, bf16_supported
from klbelt.rl.merged_sampler import MergedCopySampler
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.samplers import make_sampler
from klbelt.rl.trainer import train
from tiny_models import tiny_gpt2, word_tokenizer

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


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("bf16_base", [True, False])
def test_bf16_lora_holds_the_frozen_base_in_bf16_and_the_reference_is_that_base(tmp_path, bf16_base):
    from klbelt.rl.lora import Reference

    tok = word_tokenizer(WORDS)
    frozen = tiny_gpt2(len(tok), n_layer=1, n_embd=32, seed=1)
    model = apply_lora(copy.deepcopy(frozen), 4)
    cfg = TrainConfig(steps=1, batch_size=8, group_size=2, advantage="group", max_new_tokens=6, lora_rank=4, bf16=True,
                      bf16_base=bf16_base, checkpoint_every=100, out=str(tmp_path / "run"))
    train(cfg, model, tok, ["a b", "c d", "w1", "w2 w3"], lambda texts: torch.tensor([float(len(t)) for t in texts]),
          warn_alerts=False)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    want = torch.bfloat16 if bf16_base else torch.float32
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {want}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # the adapters train in fp32
    # the reference is the base as held: a frozen copy cast the same way scores the same log-probs
    ids, mask = _prompts(tok)
    roll = sample(frozen, ids, mask, generator=torch.Generator().manual_seed(0), **KW)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = Reference(model).logprobs(roll)
        want_lp = response_logprobs(frozen.to(want), roll)
    torch.testing.assert_close(got.float(), want_lp.float(), atol=0, rtol=0)
