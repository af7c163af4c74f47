"""``klbelt bench kernels`` runs end to end at a tiny size and prints the promised JSON rows."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

from klbelt.cli.main import main

KEYS = {
    "name",
    "baseline",
    "dtype",
    "pass",
    "median_ms",
    "baseline_median_ms",
    "speedup",
    "extra_peak_mb",
    "baseline_extra_peak_mb",
}


@pytest.fixture(scope="module")
def rows():
    """The benchmark's JSON rows at a tiny size (run once for all the tests below)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["bench", "kernels", "--rows", "64", "--vocab", "512", "--repeats", "2", "--warmup", "0", "--json"])
    assert code == 0
    return json.loads(buffer.getvalue())


def test_json_rows_have_the_promised_keys_and_sane_values(rows):
    assert rows, "no rows"
    for row in rows:
        assert KEYS <= row.keys(), row
        assert row["pass"] in ("forward", "forward+backward")
        assert row["dtype"] in ("fp32", "bf16")
        for key in ("median_ms", "baseline_median_ms", "speedup"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        ratio = row["baseline_median_ms"] / row["median_ms"]
        assert row["speedup"] == pytest.approx(ratio, rel=0.02, abs=0.002)  # both are rounded
        for key in ("extra_peak_mb", "baseline_extra_peak_mb"):
            assert row[key] is None or (0 <= row[key] < 1024), (key, row)


def test_every_function_dtype_and_pass_is_compared_with_its_baselines(rows):
    seen = {(r["name"], r["baseline"], r["dtype"], r["pass"]) for r in rows}
    baselines = {
        "logprobs_from_logits": {"naive log_softmax+gather"},
        "kl_from_logits": {"naive (p*(logp-logq)).sum(-1)", "F.kl_div(log_target=True)"},
    }
    try:
        import trl.trainer.utils  # noqa: F401
    except Exception:
        pass
    else:
        baselines["logprobs_from_logits"].add("trl selective_log_softmax")
    for name, names in baselines.items():
        for baseline in names:
            for dtype in ("fp32", "bf16"):
                for pass_ in ("forward", "forward+backward"):
                    assert (name, baseline, dtype, pass_) in seen


def test_every_row_carries_its_floor_measured_in_the_same_run(rows):
    for row in rows:
        assert row["device"] == "cpu" and row["read_ms"] > 0 and row["read_write_ms"] > 0, row
        # the floor is one read (+ one write with the backward), plus one read of the reference for the KL
        base = row["read_ms"] if row["pass"] == "forward" else row["read_write_ms"]
        extra = row["read_ms"] if row["name"] == "kl_from_logits" else 0.0
        assert row["floor_ms"] == pytest.approx(base + extra, rel=1e-3, abs=2e-4), row
        assert row["over_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"], rel=0.02), row


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where no CUDA device exists")
def test_device_cuda_without_a_cuda_device_is_refused_by_name(capsys):
    assert main(["bench", "kernels", "--device", "cuda", "--rows", "4", "--vocab", "8", "--no-memory"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_where_klbelt_runs_triton_kernels_its_torch_kernels_are_a_baseline(tmp_path):
    # CUDA in production; here Triton's interpreter on CPU tensors stands in for it
    env = {**os.environ, "TRITON_INTERPRET": "1", "KLBELT_TRITON_CPU": "1"}
    args = ["--rows", "8", "--vocab", "64", "--dtypes", "fp32", "--no-memory", "--repeats", "1", "--warmup", "0",
            "--json", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "klbelt", "bench", "kernels", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    torch_rows = [(r["name"], r["pass"]) for r in rows if r["baseline"] == "klbelt, torch kernels"]
    assert sorted(torch_rows) == sorted((n, p) for n in ("logprobs_from_logits", "kl_from_logits")
                                        for p in ("forward", "forward+backward"))
    assert all(r["triton"] for r in rows)
    proc = subprocess.run([sys.executable, "-m", "klbelt", "bench", "kernels", *args], capture_output=True, text=True,
                          timeout=300, env={**env, "KLBELT_TRITON_CPU": "0"})  # without Triton in play: no such row
    assert proc.returncode == 0 and "klbelt, torch kernels" not in proc.stdout
