"""`klbelt doctor`: a verdict table and an exit code a pipeline can gate on."""

from __future__ import annotations

import pytest
import torch

from klbelt import KLMonitor
from klbelt.cli.main import main


def _run(log_dir, kl_value, steps=20, **extra):
    with KLMonitor(log_dir, warn=False) as monitor:
        for t in range(steps):
            monitor.log_step(t, kl=torch.full((2, 4), kl_value(t)), kl_coef=0.1, **extra)


@pytest.mark.parametrize(
    "kl_value, code, word",
    [
        (lambda t: 0.05 * min(1.0, t / 5), 0, "healthy"),  # 0 before the first update (else step0_kl warns)
        (lambda t: 0.5, 1, "warnings"),  # drifting above the band
        (lambda t: -0.05, 2, "unhealthy"),  # an estimate that stays negative
    ],
)
def test_doctor_exit_code_is_0_healthy_1_warnings_2_unhealthy(tmp_path, capsys, kl_value, code, word):
    _run(tmp_path, kl_value)
    assert main(["doctor", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["RULE", "STATUS", "ALERT"]
    assert f"verdict: {word} (exit code {code})" in out
    for rule in ("kl_band", "max_kl_spike", "kl_runaway", "reward_hacking", "mode_collapse", "negative_kl", "step0_kl"):
        assert rule in out


def test_doctor_names_a_non_zero_kl_at_the_first_step_with_its_usual_causes(tmp_path, capsys):
    _run(tmp_path, lambda t: 0.02 + 0.03 * min(1.0, t / 5))  # 0.02 nats/token before any update
    assert main(["doctor", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step0_kl" in out and "dropout" in out and "reference" in out


def test_doctor_reads_csv_with_a_column_mapping(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("it,my_kl\n" + "".join(f"{i},0.5\n" for i in range(12)))
    assert main(["doctor", str(path), "--column", "step=it", "--column", "kl=my_kl"]) == 1
    assert "drifting" in capsys.readouterr().out


def test_doctor_on_an_unreadable_file_exits_3_with_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["doctor", str(bad)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown run log" in err
