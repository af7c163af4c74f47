"""W&B (offline) and MLflow (local file store) sinks with the real packages, and doctor reading their runs back."""

from __future__ import annotations

import json

import pytest

from klbelt import KLMonitor
from klbelt.cli.main import main
from klbelt.monitor import read_run


def _feed(monitor, steps=12):
    for t in range(steps):
        monitor.log_metrics(t, {"kl": 0.2 if t >= 6 else 0.05, "kl_coef": 0.1, "reward": 0.1 * t})


def _doctor(capsys, path):
    code = main(["doctor", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_wandb_offline_run_reads_back_as_the_same_history_and_verdict(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monitor = KLMonitor(tmp_path / "run", sinks=["jsonl", "wandb"], warn=False)
    _feed(monitor)
    monitor.close()
    (wandb_dir,) = (tmp_path / "run").glob("wandb")
    run = read_run(wandb_dir)
    assert run.format == "wandb"
    assert [{k: r[k] for k in ("step", "kl", "kl_coef", "reward")} for r in run.records] == [
        {k: r[k] for k in ("step", "kl", "kl_coef", "reward")} for r in monitor.history]
    code_wb, out_wb = _doctor(capsys, wandb_dir)
    code_jl, out_jl = _doctor(capsys, tmp_path / "run" / "metrics.jsonl")
    assert code_wb == code_jl == 1 and out_wb["rules"] == out_jl["rules"]  # KL 0.2 > 0.1 for 6 steps: drifting


@pytest.mark.slow
def test_mlflow_file_store_run_reads_back_as_the_same_history(tmp_path, capsys):
    pytest.importorskip("mlflow")
    monitor = KLMonitor(tmp_path, sinks=["mlflow"], warn=False)
    _feed(monitor)
    monitor.close()
    run = read_run(tmp_path / "mlruns")
    assert run.format == "mlflow"
    # one flat list per key: pytest 9.2's approx refuses nested structures such as a list of dicts
    for key in ("step", "kl", "kl_coef", "reward"):
        assert [r[key] for r in run.records] == pytest.approx([r[key] for r in monitor.history]), key
    code, out = _doctor(capsys, tmp_path / "mlruns")
    assert code == 1 and {r["rule"]: r["status"] for r in out["rules"]}["kl_band"] == "warning"
    tag = monitor.sinks[0].client.get_run(monitor.sinks[0].run_id).data.tags["klbelt.alerts"]
    assert "kl_band" in tag


def test_wandb_history_csv_export_uses_step_from_the_underscore_step_column(tmp_path):
    path = tmp_path / "wandb_export.csv"
    path.write_text("_step,_runtime,train/kl,train/reward\n" + "".join(f"{10 * i},{i}.5,0.05,0.{i}\n" for i in range(8)))
    run = read_run(path)
    assert [r["step"] for r in run.records] == [0, 10, 20, 30, 40, 50, 60, 70]
    assert all(r["kl"] == 0.05 for r in run.records)


def test_empty_or_foreign_wandb_and_mlflow_folders_are_unreadable_with_one_line(tmp_path, capsys):
    (tmp_path / "wandb" / "offline-run-x").mkdir(parents=True)
    bad = tmp_path / "wandb" / "offline-run-x" / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    assert main(["doctor", str(tmp_path / "wandb")]) == 3
    assert "not a W&B run file" in capsys.readouterr().err
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    assert main(["doctor", str(tmp_path / "mlruns")]) == 3
    assert capsys.readouterr().err.count("\n") == 1


def test_wandb_sink_raises_alerts_through_wandb_alert_only_when_online():
    wandb = pytest.importorskip("wandb")
    from klbelt.monitor.external import WandbSink
    from klbelt.monitor.rules import Alert

    class Run:  # stands in for an online wandb Run: records what the sink calls
        settings = type("S", (), {"mode": "online"})()
        calls = []

        def alert(self, **kw):
            self.calls.append(kw)

    sink = WandbSink(run=Run())
    sink.offline = False
    sink.alert(Alert("kl_band", "unhealthy", 7, "drifting", 0.3))
    assert Run.calls == [{"title": "klbelt: kl_band", "text": "[klbelt unhealthy] step 7: kl_band: drifting",
                          "level": wandb.AlertLevel.ERROR}]


@pytest.mark.slow
def test_trainer_report_to_sends_the_same_metrics_through_csv_tensorboard_and_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    import torch

    from klbelt.rl.config import TrainConfig
    from klbelt.rl.io import read_jsonl
    from klbelt.rl.trainer import train
    from tiny_models import tiny_gpt2, word_tokenizer

    tok = word_tokenizer(["a", "b", "c", "d"])
    cfg = TrainConfig(steps=3, batch_size=4, max_new_tokens=3, out=str(tmp_path), checkpoint_every=3,
                      report_to=["jsonl", "csv", "tensorboard", "mlflow"])
    train(cfg, tiny_gpt2(len(tok)), tok, ["a", "b c"], lambda texts: torch.tensor([float("a" in t) for t in texts]))
    want = read_jsonl(tmp_path / "metrics.jsonl")
    for path in (tmp_path / "metrics.csv", tmp_path / "tb", tmp_path / "mlruns"):
        got = read_run(path).records
        assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2], path
        assert [r["kl"] for r in got] == pytest.approx([r["kl"] for r in want], rel=1e-6), path
        assert [r["kl_coef"] for r in got] == pytest.approx([r["kl_coef"] for r in want], rel=1e-6), path


def test_report_to_rejects_an_unknown_sink_naming_the_choices():
    from klbelt.rl.config import TrainConfig

    with pytest.raises(ValueError, match="report_to.*'wandb'.*got \\['neptune'\\]"):
        TrainConfig(report_to=["neptune"])


@pytest.mark.slow
def test_resumed_training_continues_the_same_wandb_and_mlflow_runs_without_duplicate_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import torch

    from klbelt.rl.config import TrainConfig
    from klbelt.rl.io import read_jsonl
    from klbelt.rl.trainer import train
    from tiny_models import tiny_gpt2, word_tokenizer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tok = word_tokenizer(["a", "b", "c", "d"])

    def reward(texts):
        return torch.tensor([float("a" in t) for t in texts])

    base = dict(steps=4, batch_size=4, max_new_tokens=3, checkpoint_every=2,
                report_to=["jsonl", "csv", "tensorboard", "wandb", "mlflow"])

    def crash_at_step_2(record):  # step 2 is logged everywhere; the checkpoint holds steps 0-1
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(tmp_path)), tiny_gpt2(len(tok)), tok, ["a", "b c"], reward,
              on_step=crash_at_step_2)
    import wandb

    wandb.finish()  # the crashed process's run ends with it (this test resumes in the same process)
    first = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in first] == [0, 1, 2]
    train(TrainConfig(**base, out=str(tmp_path)), tiny_gpt2(len(tok)), tok, ["a", "b c"], reward, resume=True)
    want = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in want] == [0, 1, 2, 3]
    # (resume is exact, so the redone step 2 has the first attempt's values: the step lists below are the test)

    # one W&B run (one id, two offline segments) and one MLflow run, not two
    segments = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(segments) == 2 and len({f.name for f in segments}) == 1  # run-<id>.wandb in two segment folders
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "klbelt"]
    assert len(client.search_runs([exp.experiment_id])) == 1
    for path in (tmp_path / "wandb", tmp_path / "mlruns", tmp_path / "metrics.csv", tmp_path / "tb"):
        got = read_run(path).records
        assert [r["step"] for r in got] == [0, 1, 2, 3], path  # step 2 once, with the resumed run's value
        assert [r["kl"] for r in got] == pytest.approx([r["kl"] for r in want], rel=1e-6), path
    # TensorBoard's own loader (not klbelt's reader) sees step 2 once: the resumed writer purged it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    assert [e.step for e in board.Scalars("klbelt/kl")] == [0, 1, 2, 3]


def test_an_empty_wandb_folder_and_a_foreign_mlflow_run_folder_are_unreadable_with_one_line(tmp_path, capsys):
    (tmp_path / "wandb").mkdir()
    assert main(["doctor", str(tmp_path / "wandb")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no W&B run" in err
    run = tmp_path / "mlruns" / "0" / "abc"  # MLflow's layout, but not MLflow's files
    (run / "metrics").mkdir(parents=True)
    (run / "meta.yaml").write_text("this: [is not an mlflow run\n")
    assert main(["doctor", str(tmp_path / "mlruns")]) == 3
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("name", ["policy/approxkl_avg", "train/ppo_kl", "approx_kl"])
def test_only_old_vs_new_policy_kl_under_trl_openrlhf_names_exits_4_and_says_so(tmp_path, capsys, name):
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps({"step": s, name: 0.003, "reward": 0.1}) + "\n" for s in range(20)))
    code, out = _doctor(capsys, log)
    assert code == 4 == out["exit_code"]
    assert any("old and the new policy" in m for m in out["messages"])
