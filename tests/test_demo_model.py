"""The shipped demo model folder: a plain Hugging Face model that loads, tokenizes and generates."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
from klbelt.demo import DEMO_MODEL_DIR, demo_prompts, load_demo_model  # noqa: E402
from klbelt.demo.corpus import load_fortunes  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def test_shipped_folder_is_at_most_10_mb():
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir() if p.is_file())
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"


def test_loads_with_plain_auto_classes_as_a_gpt2_without_dropout():
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    c = model.config
    assert (c.model_type, c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == ("gpt2", 4, 192, 6, 128, 1024)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    assert 1.9e6 < sum(p.numel() for p in model.parameters()) < 2.1e6
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_tokenizer_round_trips_text(demo):
    _, tok = demo
    text = 'He said: "Ça va?"\n\tQuoth the raven -- 42% of "nevermore"!!'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges do something


def test_demo_prompts_are_deterministic_and_reencode_to_six_tokens(demo):
    _, tok = demo
    prompts = demo_prompts(tok, n=16)
    assert prompts == demo_prompts(tok, n=16)
    for p in prompts:
        assert p[0].isalpha()
        assert len(tok.encode(p, add_special_tokens=False)) == 6


def test_left_padded_batch_generates_what_each_prompt_generates_alone(demo):
    model, tok = demo
    prompts = demo_prompts(tok, n=2)
    prompts = [prompts[0], prompts[1] + " and then"]  # different lengths -> padding
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        single = tok([p], return_tensors="pt")
        alone = model.generate(**single, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        new = alone[0, single["input_ids"].shape[1] :].tolist()  # shorter if it ended with <|endoftext|>
        assert out[i, width : width + len(new)].tolist() == new
    assert tok.batch_decode(out[:, width:], skip_special_tokens=True)[0].strip()


def test_shipped_model_predicts_eval_text_far_better_than_uniform(demo):
    model, tok = demo
    ids = []
    for entry in load_fortunes("eval")[:60]:
        ids += [tok.eos_token_id] + tok.encode(entry, add_special_tokens=False)
    windows = torch.tensor(ids[: 8 * 128]).view(8, 128)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert loss < math.log(1024) - 2.0  # 6.93 - 2.0; the report says what pre-training reached
    report = json.loads((DEMO_MODEL_DIR / "pretrain_report.json").read_text())
    assert report["loss"]["validation"] < math.log(1024) - 2.0
