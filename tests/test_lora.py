"""LoRA (peft) policies whose reference is the same base weights with the adapters off; bf16 autocast."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from klbelt.rl import lora
from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import Reference, apply_lora
from klbelt.rl.rollout import response_logprobs, sample
from klbelt.rl.trainer import train
from tiny_models import tiny_llama, word_tokenizer

WORDS = ["a", "b", "c", "d", "e"]


def _rollout(model, tok, n=6, new=5, seed=0):
    enc = tok(["a b", "c", "d e a", "b", "e e", "a"][:n], return_tensors="pt", padding=True)
    return sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=new, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))


def _reward(texts):
    return torch.tensor([t.split().count("a") / 5.0 for t in texts])


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def test_lora_reference_logprobs_equal_a_frozen_copy_of_the_base(tok):
    base = tiny_llama(len(tok))
    frozen = copy.deepcopy(base).requires_grad_(False)
    policy = apply_lora(base, rank=4)
    with torch.no_grad():  # move the adapters away from zero so that they change the policy
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    roll = _rollout(policy, tok)
    ref = Reference(policy).logprobs(roll)
    expected = response_logprobs(frozen, roll)
    assert torch.equal(ref, expected)
    with torch.no_grad():
        adapted = response_logprobs(policy, roll)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters are on outside the reference's block
    # no second copy: only the adapters are trainable, the reference reads the same tensors
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_training_keeps_the_base_weights_and_checkpoints_only_the_adapters(tmp_path, tok):
    base = tiny_llama(len(tok))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = TrainConfig(model="tiny", steps=3, batch_size=6, max_new_tokens=4, lora_rank=4, lr=5e-2, advantage="group",
                      group_size=2, kl_coef=0.1, controller="fixed", out=str(tmp_path / "run"), checkpoint_every=1)
    hist = train(cfg, base, tok, ["a", "b c", "d"], _reward, warn_alerts=False)
    assert len(hist) == 3 and all(h["kl"] == h["kl"] for h in hist)
    assert hist[-1]["kl"] != 0.0  # the adapters moved the policy away from the reference
    after = {n.replace("base_layer.", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["policy"] and all("lora_" in k for k in state["policy"])


@pytest.mark.parametrize("engine", [{}, dict(bf16=True, sampler="bf16-merged", bf16_base=True)], ids=["fp32", "bf16-base-merged"])
def test_lora_run_resumed_from_its_checkpoint_ends_with_the_same_metrics(tmp_path, tok, engine):
    if engine and not lora.bf16_supported():
        pytest.skip("this CPU has no native bf16")
    common = dict(model="tiny", batch_size=6, max_new_tokens=4, lora_rank=4, lr=5e-2, advantage="group", group_size=2,
                  kl_coef=0.1, controller="adaptive", checkpoint_every=2, **engine)
    full = train(TrainConfig(steps=4, out=str(tmp_path / "full"), **common), tiny_llama(len(tok)), tok, ["a", "b c", "d"], _reward, warn_alerts=False)
    train(TrainConfig(steps=2, out=str(tmp_path / "cut"), **common), tiny_llama(len(tok)), tok, ["a", "b c", "d"], _reward, warn_alerts=False)
    train(TrainConfig(steps=4, out=str(tmp_path / "cut"), **common), tiny_llama(len(tok)), tok, ["a", "b c", "d"], _reward,
          resume=True, warn_alerts=False)
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(full, resumed):
        assert a["step"] == b["step"] and a["kl"] == pytest.approx(b["kl"], abs=1e-6) and a["kl_coef"] == pytest.approx(b["kl_coef"])


def test_lora_on_a_model_without_targetable_layers_names_the_layers_it_found():
    class HeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.lm_head = nn.Linear(4, 7)

    with pytest.raises(ValueError, match=r"cannot target.*named: lm_head"):
        apply_lora(HeadOnly(), rank=2)


def test_bf16_on_a_cpu_without_support_warns_and_runs_fp32(monkeypatch):
    from klbelt.rl import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        assert precision.resolve_bf16(True, "cpu") is False
    assert precision.resolve_bf16(False, "cpu") is False


@pytest.mark.skipif(not lora.bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_autocast_keeps_logprobs_fp32_and_close_to_fp32(tok):
    model = tiny_llama(len(tok))
    roll = _rollout(model, tok)
    with torch.no_grad():
        exact = response_logprobs(model, roll)
        with lora.autocast("cpu", True):
            fast = response_logprobs(model, roll)
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max() < 0.1 and not torch.equal(fast, exact)  # bf16 matmuls really ran


def test_lora_config_rejects_a_negative_rank():
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        TrainConfig(lora_rank=-1)
