"""``klbelt bench fused``: the JSON rows carry the keys issue 15 names, with the right yardsticks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {
    "function", "pass", "rows", "hidden", "vocab", "dtype", "fused_ms", "unfused_ms", "naive_ms",
    "fused_extra_peak_mb", "unfused_extra_peak_mb", "logits_mb",
}


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "klbelt", "bench", "fused", *args],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_json_rows_have_the_issue_keys_logits_size_and_the_repeats_of_big_cells():
    proc = _bench("--rows", "48", "--hidden", "8", "--vocab", "512", "--dtypes", "float32", "--functions", "logprobs",
                  "--repeats", "3", "--big-repeats", "2", "--big-gflop", "0.0003", "--head-backward", "bounded", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [r["pass"] for r in rows] == ["forward", "forward+backward"]
    for row in rows:
        assert KEYS <= row.keys(), KEYS - row.keys()
        assert row["logits_mb"] == 48 * 512 * 4 / 2**20
        assert row["head_backward"] == "bounded"
        assert row["repeats"] == 2  # 2 * 48 * 8 * 512 / 1e9 = 0.0004 GFLOP >= --big-gflop
        assert all(row[k] > 0 for k in ("fused_ms", "unfused_ms", "naive_ms", "matmul_ms", "read_ms"))
        matmuls = 1 if row["pass"] == "forward" else 3  # the floor: one matmul forward, three with the backward
        assert row["fused_over_matmul"] == pytest.approx(row["fused_ms"] / (matmuls * row["matmul_ms"]))
    assert "median of 2" in proc.stderr  # the table goes to stderr next to the JSON


def test_a_non_positive_repeat_count_is_refused_naming_the_option():
    proc = _bench("--repeats", "0")
    assert proc.returncode != 0
    assert "--repeats" in proc.stderr and "'0'" in proc.stderr
