"""Readers turn klbelt JSONL, TensorBoard, CSV and TRL logs into one history; bad files get one line."""

from __future__ import annotations

import pytest
import torch

from klbelt.monitor import ALIASES, KLMonitor, RunReadError, read_run
from klbelt.monitor.readers import normalize_logs


def _write_run(log_dir, sinks=("jsonl",), steps=6):
    with KLMonitor(log_dir, sinks=list(sinks), warn=False) as monitor:
        for step in range(steps):
            monitor.log_step(step, kl=torch.full((2, 3), 0.01 * (step + 1)), kl_coef=0.1, reward=float(step))
    return monitor.history


def test_truncated_jsonl_is_read_up_to_the_cut_line_with_a_warning(tmp_path):
    _write_run(tmp_path)
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 25])  # a crash in the middle of the last line
    with pytest.warns(UserWarning, match="last line 6 is cut short"):
        run = read_run(tmp_path)
    assert [r["step"] for r in run.records] == [0, 1, 2, 3, 4] and run.notes


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("run.jsonl", '{"step": 0}\nnot json\n{"step": 2}\n', "line 2 is not JSON"),
        ("run.jsonl", '{"epoch": 1}\n', "line 1 is not a klbelt step record"),
        ("run.jsonl", "", "no step records"),
        ("run.jsonl", b"\xff\xfe\x00binary", "not a text file"),
        ("trainer_state.json", '{"global_step": 3}', "without a 'log_history' list"),
        ("trainer_state.json", "{oops", "not valid JSON"),
        ("model.safetensors", b"\x00\x01", "unknown run log"),
        ("m.csv", "a,b\nx,y\n", "no numeric metric columns"),
    ],
)
def test_unreadable_or_foreign_file_gets_one_line_naming_it(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RunReadError, match=match) as err:
        read_run(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(RunReadError, match="no such file"):
        read_run(tmp_path / "nope.jsonl")
    with pytest.raises(RunReadError, match="no TensorBoard event files"):
        read_run(tmp_path)


def test_tensorboard_folder_reads_back_the_same_history(tmp_path):
    pytest.importorskip("tensorboard")
    history = _write_run(tmp_path, sinks=("jsonl", "tensorboard"))
    run = read_run(tmp_path / "tb")
    assert run.format == "tensorboard" and [r["step"] for r in run.records] == list(range(6))
    for got, want in zip(run.records, history):
        assert got["kl"] == pytest.approx(want["kl"]) and got["kl_coef"] == pytest.approx(0.1)


def test_csv_with_a_column_mapping(tmp_path):
    path = tmp_path / "wandb_export.csv"
    path.write_text("global_step,train/kl_mean,score\n10,0.02,1.0\n20,0.04,1.5\n")
    run = read_run(path, columns={"step": "global_step", "kl": "train/kl_mean", "reward": "score"})
    assert run.records == [{"step": 10, "kl": 0.02, "reward": 1.0}, {"step": 20, "kl": 0.04, "reward": 1.5}]
    with pytest.raises(RunReadError, match="column\\(s\\) kl_mean not in the header"):
        read_run(path, columns={"kl": "kl_mean"})


def test_trl_names_map_to_klbelt_names_with_the_right_units():
    # TRL's PPO/RLOO sums KL over the response: objective/kl is nats/sequence
    rec = normalize_logs({"objective/kl": 3.2, "objective/scores": 0.5, "objective/entropy": 40.0, "step": 7})
    assert rec == {"step": 7, "kl_seq": 3.2, "reward": 0.5, "entropy_seq": 40.0}
    # GRPO's kl is a masked per-token mean: nats/token
    assert normalize_logs({"kl": 0.01, "reward": 1.0, "train/entropy": 2.0}, step=3) == {
        "step": 3, "kl": 0.01, "reward": 1.0, "entropy": 2.0}
    assert normalize_logs({"eval_loss": 1.0}) is None and normalize_logs({"train_runtime": 3.0}) is None
    assert ALIASES["objective/kl"] == "kl_seq"

