"""The ``vllm`` sampler: vLLM (CPU build, in its own venv) draws the rollouts from the policy's current weights.

The tests that start vLLM run only where ``$KLBELT_VLLM_PYTHON`` names the
python of a venv built by ``scripts/setup_vllm.sh``; CI has none, so they skip
there (with that reason). The others need no vLLM.
"""

from __future__ import annotations

import os

import pytest
import torch

from klbelt.rl.config import TrainConfig
from klbelt.rl.rollout import response_logprobs
from klbelt.rl.samplers import make_sampler
from klbelt.rl.vllm_sampler import ENV_PYTHON, VLLMSampler, merged_state_dict
from tiny_models import tiny_gpt2

VLLM_PYTHON = os.environ.get(ENV_PYTHON)
needs_vllm = pytest.mark.skipif(
    not (VLLM_PYTHON and os.path.isfile(VLLM_PYTHON)),
    reason=f"${ENV_PYTHON} does not name the python of a vLLM venv (bash scripts/setup_vllm.sh DIR); CI has none",
)
PROMPTS = ["Once upon a time", "The weather today", "I like", "She said that the"] * 2


def test_vllm_sampler_without_a_vllm_python_names_the_setting_and_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_PYTHON, raising=False)
    with pytest.raises(ValueError, match=r"vllm_python.*KLBELT_VLLM_PYTHON.*setup_vllm\.sh"):
        make_sampler("vllm")
    with pytest.raises(ValueError, match=r"vllm_python must be an executable python.*nope"):
        make_sampler("vllm", vllm_python=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="sampler 'vllm' needs top_k 0 and top_p 1.0"):
        TrainConfig(sampler="vllm", top_p=0.9)
    with pytest.raises(ValueError, match="config vllm_python"):
        TrainConfig(sampler="vllm", vllm_python="")


def test_merged_lora_weights_are_peft_merge_and_unload_of_the_same_adapters():
    pytest.importorskip("peft")
    from klbelt.rl.lora import apply_lora

    model = apply_lora(tiny_gpt2(20, n_layer=2, n_embd=16, seed=1), 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters away from their zero start
    merged = merged_state_dict(model)
    truth = model.merge_and_unload().state_dict()  # peft's own merge (mutates model)
    assert "lm_head.weight" not in merged and "transformer.wte.weight" in merged  # tied: written once
    assert not any("lora" in k or "base_layer" in k for k in merged)
    assert set(merged) == set(truth) - {"lm_head.weight"}
    moved = 0
    for key, value in merged.items():
        torch.testing.assert_close(value, truth[key].float(), atol=1e-6, rtol=1e-6)
        moved += key.endswith("c_attn.weight")
    assert moved == 2


@pytest.fixture(scope="module")
def demo_model():
    from klbelt.demo.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("tiny")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return model, tok, enc


def _draw(sampler, model, tok, enc, **kw):
    kw = {"max_new_tokens": 12, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
          "generator": torch.Generator().manual_seed(0), **kw}
    roll = sampler(model, enc["input_ids"], enc["attention_mask"], **kw)
    with torch.no_grad():
        trainer = response_logprobs(model, roll, kw.get("temperature", 1.0))
    return roll, trainer


def _check_valid(roll, tok, enc, blocked_eos: bool):
    mask = roll.response_mask > 0
    B, P = enc["input_ids"].shape
    assert roll.prompt_len == P and torch.equal(roll.sequences[:, :P], enc["input_ids"])
    assert bool(((roll.responses >= 0) & (roll.responses < len(tok))).all())
    for b in range(B):
        n = int(mask[b].sum())
        assert n >= 1 and bool(mask[b, :n].all()) and not bool(mask[b, n:].any())  # a prefix
        ids = roll.responses[b, :n].tolist()
        assert tok.eos_token_id not in ids[:-1]  # stops at the first EOS, which it keeps
        if n < roll.responses.shape[1]:
            assert ids[-1] == tok.eos_token_id
    if blocked_eos:
        assert not bool((roll.responses[mask] == tok.eos_token_id).any())
        assert bool(mask.all())
    assert bool((roll.logprobs[mask] <= 0).all()) and bool((roll.logprobs[~mask] == 0).all())


@pytest.mark.slow
@needs_vllm
def test_vllm_fp32_logprobs_are_the_trainers_and_follow_every_weight_update(demo_model):
    """fp32 vLLM and the trainer's fp32 forward: same log-probs of vLLM's tokens to 1e-4 nats
    (measured: 2e-6), also after LoRA adapters move (merged weights reloaded in place)."""
    from klbelt.rl.lora import apply_lora

    base, tok, enc = demo_model
    model = apply_lora(base, 4)
    sampler = VLLMSampler(VLLM_PYTHON, dtype="float32")
    try:
        for update in range(3):
            blocked = (tok.eos_token_id,) if update == 0 else ()
            roll, trainer = _draw(sampler, model, tok, enc, blocked_token_ids=blocked, temperature=1.0 if update < 2 else 0.7)
            _check_valid(roll, tok, enc, blocked_eos=bool(blocked))
            mask = roll.response_mask > 0
            gap = (trainer - roll.logprobs)[mask].abs().max()
            assert gap < 1e-4, (update, float(gap))
            with torch.no_grad():  # the next update's policy: moved adapters
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn_like(p) * 0.05)
        # the moves were large enough that stale weights in vLLM would have failed the check
        stale = response_logprobs(model, roll, 0.7).detach()
        assert float((stale - roll.logprobs)[roll.response_mask > 0].abs().max()) > 1e-2
    finally:
        sampler.close()
        assert sampler.proc is None


@pytest.mark.slow
@needs_vllm
def test_bf16_vllm_is_a_real_but_small_mismatch(demo_model):
    """vLLM's default bf16 against the fp32 trainer: not rounding-level, not a different model."""
    model, tok, enc = demo_model
    sampler = make_sampler("vllm", vllm_python=VLLM_PYTHON)
    try:
        roll, trainer = _draw(sampler, model, tok, enc)
    finally:
        sampler.close()
    _check_valid(roll, tok, enc, blocked_eos=False)
    delta = (trainer - roll.logprobs)[roll.response_mask > 0]
    assert 1e-4 < float(delta.abs().max()) < 0.5
    assert abs(float(delta.mean())) < 0.05


@pytest.mark.slow
@needs_vllm
def test_trainer_with_the_vllm_sampler_logs_the_mismatch_and_trains(demo_model, tmp_path, monkeypatch):
    """`sampler: vllm` through klbelt.rl.trainer.train (the worker's python from $KLBELT_VLLM_PYTHON)."""
    from klbelt.rl.trainer import train

    base, tok, _ = demo_model
    monkeypatch.setenv(ENV_PYTHON, VLLM_PYTHON)
    cfg = TrainConfig(steps=2, batch_size=8, max_new_tokens=8, block_eos=True, sampler="vllm", rollout_correction="tis",
                      is_cap=2.0, kl_coef=0.1, controller="fixed", advantage="group", group_size=2, lr=1e-3,
                      checkpoint_every=10, samples_every=10, out=str(tmp_path / "run"))
    import copy

    history = train(cfg, copy.deepcopy(base), tok, PROMPTS, lambda texts: torch.zeros(len(texts)), warn_alerts=False)
    assert len(history) == 2
    for record in history:
        # vLLM's bf16 against the fp32 trainer: a measured, small, nonzero mismatch; TIS weights within (0, cap]
        assert 0 < record["mismatch_max_logratio"] < 1.0
        assert abs(record["mismatch_kl"]) < 0.05 and 0 <= record["mismatch_k3"] < 0.05
        assert 0 < record["is_weight_min"] <= record["is_weight_mean"] <= record["is_weight_max"] <= 2.0
