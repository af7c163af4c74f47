"""`klbelt pretrain` writes a loadable Hugging Face model folder with its report."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
from klbelt.cli.main import main  # noqa: E402


def test_pretrain_at_a_tiny_token_budget_writes_a_loadable_model_folder(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["pretrain", "--out", str(out), "--max-tokens", "1024", "--batch-size", "4", "--threads", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == 1024
    assert model.config.resid_pdrop == 0.0  # trained with dropout, saved without
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["budget"]["tokens"] == 1024 and report["budget"]["steps"] == 2
    assert set(report["loss"]) >= {"train", "validation"}
    assert len(report["samples"]) == 4
    assert "--max-tokens 1024" in (out / "README.md").read_text()


def test_pretrain_rejects_a_non_positive_budget(tmp_path):
    with pytest.raises(SystemExit, match="--max-tokens must be >= 1"):
        main(["pretrain", "--out", str(tmp_path), "--max-tokens", "0"])
