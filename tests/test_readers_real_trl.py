"""Readers on logs that TRL itself wrote (tests/data/make_trl_logs.py): PPO on TRL 1.0.0, GRPO on TRL 1.16.0."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from klbelt.cli.main import main
from klbelt.monitor import read_run

DATA = Path(__file__).parent / "data"
PPO = DATA / "trl_ppo_trainer_state.json"
GRPO_LATEST = DATA / "trl_grpo_1.16_trainer_state.json"


def _history(path):
    return json.loads(path.read_text())["log_history"]


def test_the_ppo_log_holds_exactly_the_metrics_trl_1_0_ppotrainer_logs():
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("trl")  # located, not imported (importing its PPO module takes ~10 s)
    if spec is None:
        pytest.skip("trl is not installed")
    version = importlib.metadata.version("trl")
    if version != "1.0.0":
        pytest.skip(f"the PPO log was written by TRL 1.0.0; this python has {version}")
    source = Path(spec.submodule_search_locations[0]) / "experimental" / "ppo" / "ppo_trainer.py"
    # the names TRL's own PPOTrainer code assigns, read from the installed source (not from this repo)
    logged = set(re.findall(r'metrics\["([^"]+)"\]', source.read_text()))
    assert {"objective/kl", "objective/scores", "policy/approxkl_avg"} <= logged
    history = _history(PPO)
    assert [e["step"] for e in history] == list(range(1, 13))
    for entry in history:  # transformers' Trainer.log adds epoch and step
        assert set(entry) == logged | {"epoch", "step"}, set(entry) ^ (logged | {"epoch", "step"})


def test_real_grpo_1_16_log_reads_per_token_kl_and_the_band_verdict_is_true(capsys):
    history = _history(GRPO_LATEST)
    run = read_run(GRPO_LATEST)
    assert [r["kl"] for r in run.records] == [e["kl"] for e in history]
    assert [r["reward"] for r in run.records] == [e["reward"] for e in history]
    # independent truth: this run's per-token KL stays above the default band's 0.1 nats/token at the end
    assert min(e["kl"] for e in history[-5:]) > 0.1
    code = main(["doctor", str(GRPO_LATEST), "--json"])
    out = json.loads(capsys.readouterr().out)
    status = {r["rule"]: r["status"] for r in out["rules"]}
    assert status["kl_band"] == "warning" and code == 1 == out["exit_code"]
