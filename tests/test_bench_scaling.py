"""``klbelt bench scaling``: 1 vs N processes of the real trainer, same per-rank batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from klbelt.cli.main import main


@pytest.mark.slow
def test_bench_scaling_times_real_one_and_two_process_runs_and_reports_their_ratio():
    done = subprocess.run(
        [sys.executable, "-m", "klbelt", "bench", "scaling", "--runs", "1", "--warmup", "1", "--updates", "2",
         "--batch-per-rank", "2", "--response-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    one, two = result["rows"]
    assert (one["nproc"], two["nproc"]) == (1, 2)
    assert (one["global_batch"], two["global_batch"]) == (2, 4)
    assert one["updates_timed"] == two["updates_timed"] == 2
    for row in (one, two):
        assert row["tokens_per_s"] == pytest.approx(row["global_batch"] * 4 / row["median_s_per_update"])
    assert result["speedup"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert result["target"] == 1.7 and result["threads_per_process"] == 1


@pytest.mark.parametrize("flag,value", [("--nproc", "1"), ("--runs", "0"), ("--batch-per-rank", "0"), ("--warmup", "-1")])
def test_bench_scaling_refuses_bad_arguments(flag, value, capsys):
    assert main(["bench", "scaling", flag, value]) == 2
    assert flag in capsys.readouterr().err
