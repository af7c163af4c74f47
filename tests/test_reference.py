"""The reference is the policy as given (``reference: initial``), adapters included; ``ref_sync_every``
makes it the current policy every N updates, and a resumed run restores the synced reference."""

from __future__ import annotations

import json

import pytest
import torch

from klbelt.rl.config import TrainConfig
from klbelt.rl.lora import apply_lora
from klbelt.rl.trainer import train
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["a", "b", "c", "d"]
PROMPTS = ["a", "b c", "d"]


def _reward_fn(texts):
    return torch.tensor([t.split().count("a") - 0.5 * t.split().count("c") for t in texts], dtype=torch.float32)


def _adapted_policy(tok):
    """RL after a LoRA SFT: a policy that arrives with a trained (here random) r=4 adapter."""
    policy = apply_lora(tiny_gpt2(len(tok), seed=4), 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return policy


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


@pytest.mark.parametrize("reference", ["initial", "base"])
def test_a_policy_that_starts_with_adapters_is_its_own_reference_unless_base_is_asked(tmp_path, reference):
    tok = word_tokenizer(WORDS)
    cfg = TrainConfig(steps=1, batch_size=6, max_new_tokens=4, lr=1e-9, critic_lr=1e-9, reference=reference,
                      out=str(tmp_path))
    (record,) = train(cfg, _adapted_policy(tok), tok, PROMPTS, _reward_fn, warn_alerts=False)
    if reference == "initial":
        assert abs(record["kl"]) < 1e-6 and abs(record["kl_k3"]) < 1e-6
    else:  # today's behaviour, kept under "base": the KL to the bare base model
        assert record["kl_k3"] > 1e-3


def test_an_explicit_reference_model_with_a_policy_that_has_adapters_is_refused_naming_both(tmp_path):
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match=r"config reference 'initial' and ref_policy"):
        train(TrainConfig(steps=1, batch_size=6, out=str(tmp_path)), _adapted_policy(tok), tok, PROMPTS, _reward_fn,
              ref_policy=tiny_gpt2(len(tok)))


def test_ref_sync_every_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="config ref_sync_every must be an int >= 0"):
        TrainConfig(ref_sync_every=-1)
    with pytest.raises(ValueError, match="config reference must be one of 'initial', 'base'"):
        TrainConfig(reference="sft")


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_ref_sync_every_resets_the_reference_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path, lora_rank):
    tok = word_tokenizer(WORDS)
    base = dict(steps=6, batch_size=6, max_new_tokens=3, kl_coef=0.2, target_kl=0.01, checkpoint_every=2, lr=3e-2,
                ref_sync_every=3, lora_rank=lora_rank, lora_alpha=8.0 if lora_rank else None)
    whole = tmp_path / "whole"
    records = train(TrainConfig(**base, out=str(whole)), tiny_gpt2(len(tok)), tok, PROMPTS, _reward_fn,
                    warn_alerts=False)
    assert [r.get("ref_sync", 0) for r in records] == [0, 0, 1, 0, 0, 1]
    # the update after a sync starts from a policy equal to its reference; the one before had drifted
    assert records[2]["kl_k3"] > 1e-4 and abs(records[3]["kl_k3"]) < 1e-6
    assert records[3]["kl_coef"] == records[2]["next_kl_coef"]  # the controller keeps its state

    crashed = tmp_path / "crashed"

    def crash_at_step_4(record):
        if record["step"] == 4:  # the checkpoint (after step 3) holds the reference synced after step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(crashed)), tiny_gpt2(len(tok)), tok, PROMPTS, _reward_fn,
              on_step=crash_at_step_4, warn_alerts=False)
    train(TrainConfig(**base, out=str(crashed)), tiny_gpt2(len(tok)), tok, PROMPTS, _reward_fn, resume=True,
          warn_alerts=False)
    assert _metrics(crashed / "metrics.jsonl") == _metrics(whole / "metrics.jsonl")


def test_ref_sync_every_with_a_reference_of_another_architecture_is_refused_and_never_touches_the_callers_model(tmp_path):
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="config ref_sync_every .* ref_policy's weights are named differently"):
        train(TrainConfig(steps=1, batch_size=6, ref_sync_every=1, out=str(tmp_path / "a")), tiny_gpt2(len(tok)), tok,
              PROMPTS, _reward_fn, ref_policy=tiny_gpt2(len(tok), n_layer=2))
    ref = tiny_gpt2(len(tok), seed=7)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    train(TrainConfig(steps=2, batch_size=6, max_new_tokens=3, ref_sync_every=1, out=str(tmp_path / "b")),
          tiny_gpt2(len(tok)), tok, PROMPTS, _reward_fn, ref_policy=ref, warn_alerts=False)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
