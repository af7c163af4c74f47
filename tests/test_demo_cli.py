"""`klbelt demo` and `klbelt sweep` end to end on the shipped model (a few steps)."""

from __future__ import annotations

import json

import pytest

from klbelt.cli.main import main

DEMO_KEYS = ("step", "kl", "kl_max", "kl_seq", "kl_coef", "reward", "gold_reward", "entropy", "exclaim_rate", "distinct_2")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_every_file(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--out", str(out), "--steps", "3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in DEMO_KEYS:
        assert all(key in r for r in records), key
    for name in ("samples.jsonl", "config.json", "checkpoint.pt", "report.html", "summary.json", "policy/config.json"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "Before training" in printed and "After training" in printed and "Verdict:" in printed
    # resuming a finished run writes nothing twice
    assert main(["demo", "--model", "tiny", "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_sweep_writes_the_beta_table(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "tiny", "--betas", "0,1", "--steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["beta"] for r in rows] == [0.0, 1.0]
    for key in ("beta", "reward", "gold_reward", "kl", "exclaim_rate", "distinct_2", "verdict"):
        assert all(key in r for r in rows), key


def test_sweep_rejects_bad_betas(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage line + one error line, exit 2
        main(["sweep", "--betas", "0,-1"])
    assert exit_info.value.code == 2
    assert "argument --betas: betas must be finite numbers >= 0, got '0,-1'" in capsys.readouterr().err
