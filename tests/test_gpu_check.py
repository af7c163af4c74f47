"""``scripts/gpu_check.sh`` (issue 25) without a GPU: the same steps at CI size on the CPU, its table, its comparisons.

On a GPU machine the script runs every trainer option on CUDA against the CPU and times the
English demo's update; here ``--device cpu --quick`` runs the same Python entry on one tiny
configuration for one update, the decode loops and a 2-layer SmolLM2-shaped model, so a broken
step shows in CI.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu_and_ends_with_one_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--no-benches",
                           "--wheels", str(tmp_path / "no-wheels"), "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, timeout=600)
    table = (tmp_path / "results" / "table.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert table.strip() in proc.stdout
    lines = table.splitlines()
    assert lines[0].split() == ["check", "status", "figure", "note"] and lines[-1].endswith(" 0 failed")
    rows = {line.split("  ")[0].strip(): line for line in lines[1:-1]}
    for check in ("option bf16-merged-lora-llama (cpu)", "decode 16x24, static eager (2x48 quick) (cpu)",
                  "English demo update, SmolLM2-shaped (2x48 quick) (cpu)"):
        assert check in rows and "  ok  " in rows[check], (check, table)
    assert "s/update, floor" in rows["English demo update, SmolLM2-shaped (2x48 quick) (cpu)"]
    assert "  skipped  " in rows[f"wheels from {tmp_path / 'no-wheels'}"]


def test_a_device_run_outside_the_tolerance_or_not_finite_fails(tmp_path):
    check = _gpu_check()
    cpu = [{"step": 0, "kl": 0.0500, "reward": 1.0, "alerts": []}, {"step": 1, "kl": 0.06, "reward": 1.1, "alerts": []}]
    close = [{"step": 0, "kl": 0.05002, "reward": 1.0, "alerts": []}, {"step": 1, "kl": 0.07, "reward": 1.1, "alerts": []}]
    ok, note = check.compare(cpu, close, "fp32")
    assert ok and "later updates max rel diff 1.4e-01" in note
    far = [dict(close[0], kl=0.0502), close[1]]
    ok, note = check.compare(cpu, far, "fp32")
    assert not ok and "kl 0.0502 vs cpu 0.05" in note
    assert check.compare(cpu, far, "bf16")[0]  # bf16's wider tolerance
    ok, note = check.compare(cpu, [close[0], dict(close[1], kl=math.nan)], "bf16")
    assert not ok and "update 1: non-finite kl" in note
    assert not check.compare(cpu, close[:1], "fp32")[0]


def test_a_broken_option_is_a_failed_row_and_the_table_counts_it(tmp_path, capsys):
    check = _gpu_check()
    assert check.main(["options", "--results", str(tmp_path), "--device", "cpu", "--configs", "no-such-option"]) == 0
    check.main(["record", "--results", str(tmp_path), "--name", "a bench", "--status", "ok", "--figure", "3 rows"])
    print(check.table(tmp_path))
    out = capsys.readouterr().out
    assert "option no-such-option (cpu)  FAIL" in out and "KeyError" in out
    assert out.rstrip().endswith("2 checks, 1 failed")
    assert out.index("no-such-option") < out.index("a bench")  # in the order the steps ran


def test_the_fortune_files_of_a_pip_target_install_are_found_through_klbelt_fortune_dir(tmp_path, monkeypatch):
    from klbelt.demo.corpus import corpus_files, fortune_dir

    folder = tmp_path / "share" / "games" / "fortune"
    folder.mkdir(parents=True)
    (folder / "wisdom").write_text("A fortune.\n%\nAnother one.\n")
    (folder / "wisdom.dat").write_bytes(b"\0")
    monkeypatch.setenv("KLBELT_FORTUNE_DIR", str(folder))
    assert fortune_dir() == folder and corpus_files() == [folder / "wisdom"]
    monkeypatch.delenv("KLBELT_FORTUNE_DIR")
    assert fortune_dir() != folder
