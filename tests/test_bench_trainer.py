"""``klbelt bench trainer`` runs end to end at a tiny size (klbelt, TRL and the floor) and prints the promised JSON."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from klbelt.bench import trainer as bench  # noqa: E402
from klbelt.cli.main import main  # noqa: E402

KEYS = {"setting", "klbelt_tokens_per_s", "trl_tokens_per_s", "speedup", "floor_tokens_per_s", "klbelt_peak_mb", "trl_peak_mb"}
TINY = ["--warmup", "1", "--updates", "1", "--runs", "1", "--floor-repeats", "1", "--batch", "4", "--response-tokens", "4",
        "--layers", "1", "--dim", "32", "--heads", "2", "--vocab", "64", "--prompt-len", "4"]


@pytest.fixture(scope="module")
def rows():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["bench", "trainer", "--settings", "A", "--json", *TINY])
    assert code == 0
    return json.loads(buffer.getvalue())


def test_json_has_one_object_per_setting_with_the_promised_keys(rows):
    assert [r["setting"] for r in rows] == ["A"]
    assert KEYS <= rows[0].keys()


def test_throughputs_are_positive_and_consistent(rows):
    row = rows[0]
    tokens = row["batch"] * row["response_tokens"]
    for side in ("klbelt", "trl"):
        assert row[f"{side}_tokens_per_s"] > 0 and math.isfinite(row[f"{side}_tokens_per_s"])
        assert row[f"{side}_tokens_per_s"] == pytest.approx(tokens / row[f"{side}_s_per_update"])
    assert row["speedup"] == pytest.approx(row["klbelt_tokens_per_s"] / row["trl_tokens_per_s"])
    assert row["floor_s_per_update"] == pytest.approx(sum(row["floor_parts_s"].values()))
    assert set(row["floor_parts_s"]) == {
        "generation", "ref_forward", "value_forward", "reward_forward",
        "policy_forward_backward", "value_forward_backward", "optimizer_steps",
    }


def test_peak_memory_is_measured_for_both_trainers(rows):
    for side in ("klbelt", "trl"):
        peak = rows[0][f"{side}_peak_mb"]
        assert peak is None or 0 <= peak < 4096  # None only where the peak cannot be reset (not Linux)


def test_steady_state_excludes_warm_up_updates():
    ends = [5.0, 6.0, 8.0, 9.0]  # end times of updates; the first (warm-up) one took 5 s
    assert bench._intervals(ends, warmup=1, updates=3) == [1.0, 2.0, 1.0]
    assert bench._intervals(ends, warmup=2, updates=2) == [2.0, 1.0]


def test_bad_settings_are_refused_with_a_message(capsys):
    assert main(["bench", "trainer", "--settings", "C"]) == 2
    assert "--settings must list settings from A, B" in capsys.readouterr().err
