"""`klbelt doctor` as a CI gate (--json, exit 0/1/2/3/4, usage 64) and other frameworks' logs with their units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klbelt import KLMonitor
from klbelt.cli.main import main
from klbelt.monitor import read_run

DATA = Path(__file__).parent / "data"


def _log(path, rows):
    path.write_text("".join(json.dumps({"step": i, **r}) + "\n" for i, r in enumerate(rows)))
    return path


def _doctor_json(capsys, *argv):
    code = main(["doctor", *map(str, argv), "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object, one line
    return code, json.loads(out)


def test_json_is_one_object_whose_exit_code_and_alert_steps_match_the_rules(tmp_path, capsys):
    with KLMonitor(tmp_path, warn=False) as monitor:
        for t in range(12):
            monitor.log_metrics(t, {"kl": 0.5, "kl_coef": 0.1})  # above the band from the start
    code, out = _doctor_json(capsys, tmp_path)
    assert code == out["exit_code"] == 1 and out["verdict"] == "warnings"
    band = next(r for r in out["rules"] if r["rule"] == "kl_band")
    assert band["status"] == "warning" and band["alert_steps"] == [4]  # 5 steps in a row: steps 0-4
    # and 0.5 nats/token before any update is named at step 0 (step0_kl)
    assert out["alert_steps"] == [0, 4] and [a["rule"] for a in out["alerts"]] == ["step0_kl", "kl_band"]
    assert {r["rule"] for r in out["rules"]} >= {"kl_band", "negative_kl", "kl_runaway"}
    assert (out["steps"], out["first_step"], out["last_step"]) == (12, 0, 11)


def test_a_rule_without_enough_history_says_so_and_a_run_too_short_for_every_rule_exits_4(tmp_path, capsys):
    short = tmp_path / "short.jsonl"  # first logged at step 2: too late for step0_kl to judge
    short.write_text("".join(json.dumps({"step": i + 2, "kl": 0.05}) + "\n" for i in range(3)))
    code, out = _doctor_json(capsys, short)
    status = {r["rule"]: (r["status"], r["message"]) for r in out["rules"]}
    assert status["kl_band"] == ("n/a", "not enough steps (3 of 5)")
    assert status["negative_kl"] == ("n/a", "not enough steps (3 of 10)")  # 10 negative steps in a row
    assert code == 4 and out["verdict"] == "nothing checked"
    # with enough steps the same rules report ok, and runaway (60 steps) still says it cannot judge
    code, out = _doctor_json(capsys, _log(tmp_path / "long.jsonl", [{"kl": 0.0}] + [{"kl": 0.05}] * 19))
    status = {r["rule"]: (r["status"], r["message"]) for r in out["rules"]}
    assert status["kl_band"][0] == "ok" and status["kl_runaway"] == ("n/a", "not enough steps (20 of 60)")
    assert code == 0


def test_a_log_with_only_old_vs_new_policy_kl_says_so_and_exits_4(capsys):
    code, out = _doctor_json(capsys, DATA / "verl_old_policy_only.jsonl")
    assert code == 4
    assert any("old and the new policy" in m for m in out["messages"])
    assert "kl" not in read_run(DATA / "verl_old_policy_only.jsonl").records[0]


def test_usage_errors_exit_64_a_code_no_verdict_uses(tmp_path, capsys):
    log = _log(tmp_path / "a.jsonl", [{"kl": 0.05}] * 3)
    for argv in (["doctor", str(log), "--bogus"], ["doctor"]):  # argparse itself would exit 2
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 64, argv
    assert main(["doctor", str(log), "--column", "kl"]) == 64  # not NAME=SOURCE
    assert main(["doctor", str(tmp_path / "missing.jsonl")]) == 3
    assert "error" in capsys.readouterr().err


def test_trl_ppo_units_sequence_kl_is_kl_seq_and_approxkl_is_not_the_reference_kl():
    run = read_run(DATA / "trl_ppo_trainer_state.json")
    raw = json.loads((DATA / "trl_ppo_trainer_state.json").read_text())["log_history"]
    assert [r["kl_seq"] for r in run.records] == [e["objective/kl"] for e in raw]
    assert [r["kl_old_policy"] for r in run.records] == [e["policy/approxkl_avg"] for e in raw]
    assert all("kl" not in r for r in run.records)  # nats/sequence never lands in the per-token column
    assert [r["reward"] for r in run.records] == [e["objective/scores"] for e in raw]


def test_openrlhf_tensorboard_log_maps_kl_and_ppo_kl_and_column_renames_any_metric(capsys):
    run = read_run(DATA / "openrlhf_tb")
    assert [r["step"] for r in run.records] == list(range(1, 13))
    assert [r["kl"] for r in run.records] == pytest.approx([0.02 + 0.002 * s for s in range(1, 13)])
    assert all(r["kl_old_policy"] == pytest.approx(0.003) for r in run.records)
    # every KL value is inside the band [0.01, 0.1] and non-negative; only the 0.022 at step 1, before
    # the first update, is named (step0_kl)
    code, out = _doctor_json(capsys, DATA / "openrlhf_tb")
    status = {r["rule"]: r["status"] for r in out["rules"]}
    assert code == 1 and status["kl_band"] == "ok" and status["step0_kl"] == "warning"
    assert {r["rule"] for r in out["rules"] if r["status"] == "warning"} == {"step0_kl"}
    renamed = read_run(DATA / "openrlhf_tb", {"gold_reward": "train/return"})
    assert all(r["gold_reward"] == pytest.approx(0.1) and "return" not in r for r in renamed.records)
