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
        assert row["head_backward"] == "bounded" and row["head_backward_used"] is None  # no Triton on a CPU
        assert row["repeats"] == 2  # 2 * 48 * 8 * 512 / 1e9 = 0.0004 GFLOP >= --big-gflop
        assert all(row[k] > 0 for k in ("fused_ms", "unfused_ms", "naive_ms", "matmul_ms", "read_ms"))
        matmuls = 1 if row["pass"] == "forward" else 3  # the floor: one matmul forward, three with the backward
        assert row["fused_over_matmul"] == pytest.approx(row["fused_ms"] / (matmuls * row["matmul_ms"]))
    assert "median of 2" in proc.stderr  # the table goes to stderr next to the JSON


def test_a_non_positive_repeat_count_is_refused_naming_the_option():
    proc = _bench("--repeats", "0")
    assert proc.returncode != 0
    assert "--repeats" in proc.stderr and "'0'" in proc.stderr


def test_in_process_gives_the_rows_a_fresh_process_gives_without_memory():
    # CUDA measures every configuration in one process (the allocator's peak is reset per call);
    # the same path runs here on the CPU with --no-memory
    proc = _bench("--rows", "40", "--hidden", "8", "--vocab", "300", "--dtypes", "float32,bfloat16",
                  "--functions", "logprobs,kl", "--repeats", "2",
                  "--in-process", "--no-memory", "--head-backward", "one-pass,bounded", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    # per function and dtype: the forward once, the forward+backward in each mode (the second: fused only)
    assert [(r["function"], r["dtype"], r["pass"], r["head_backward"]) for r in rows] == [
        (f, d, p, m) for f in ("logprobs", "kl") for d in ("float32", "bfloat16")
        for p, m in (("forward", "one-pass"), ("forward+backward", "one-pass"), ("forward+backward", "bounded"))]
    for row in rows:
        assert KEYS <= row.keys(), KEYS - row.keys()
        assert row["fused_extra_peak_mb"] is None
        timed = ("fused_ms", "matmul_ms", "read_ms") + (("unfused_ms", "naive_ms") if row["head_backward"] == "one-pass" else ())
        assert all(row[k] > 0 for k in timed)
        if row["head_backward"] == "bounded":
            assert row["naive_ms"] is None and row["unfused_ms"] is None
        assert row["triton"] is False and row["head_backward_used"] is None


def test_in_process_on_a_cpu_with_memory_is_refused_naming_both_options():
    proc = _bench("--rows", "8", "--hidden", "8", "--vocab", "64", "--in-process")
    assert proc.returncode == 2
    assert "--in-process" in proc.stderr and "--no-memory" in proc.stderr


def test_another_librarys_head_that_fails_to_import_raises_its_error_when_called(monkeypatch):
    from klbelt.bench.fused import other_heads

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import fails with ImportError
    heads = other_heads(with_liger=False, with_cce=True)
    assert set(heads) == {"cce", "cce_exact"}
    with pytest.raises(RuntimeError, match="cut_cross_entropy failed to import: ModuleNotFoundError"):
        heads["cce_exact"](None, None, None)


def test_fused_torch_times_the_fused_head_with_the_triton_kernels_off():
    proc = _bench("--rows", "16", "--hidden", "8", "--vocab", "64", "--dtypes", "float32", "--functions", "logprobs",
                  "--passes", "forward+backward", "--impls", "fused,fused_torch", "--repeats", "1",
                  "--in-process", "--no-memory", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    assert row["fused_torch_ms"] > 0 and row["fused_ms"] > 0 and row["naive_ms"] is None
    assert row["triton"] is False and row["triton_failure"] is None  # a CPU tensor outside the interpreter
    assert "fused with the torch kernels" in proc.stderr


def test_rows_say_which_bf16_backward_the_triton_head_ran():
    # Triton's interpreter on CPU tensors stands in for CUDA; fp32 has no scratch to bound: one pass
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "KLBELT_TRITON_CPU": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "klbelt", "bench", "fused", "--rows", "20", "--hidden", "8", "--vocab", "40",
         "--dtypes", "float32,bfloat16", "--functions", "logprobs", "--passes", "forward+backward",
         "--impls", "fused", "--repeats", "1", "--in-process", "--no-memory",
         "--head-backward", "auto,one-pass,bounded", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    got = [(r["dtype"], r["head_backward"], r["head_backward_used"]) for r in rows]
    assert got == [("float32", m, "one-pass") for m in ("auto", "one-pass", "bounded")] + [
        ("bfloat16", "auto", "one-pass"), ("bfloat16", "one-pass", "one-pass"), ("bfloat16", "bounded", "bounded")]
    assert all(r["triton"] is True for r in rows)
