"""KLMonitor: per-step statistics against torch references, alerts to callback/warnings/log, sinks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from klbelt import KLHealthWarning, KLMonitor, aggregate, kl_from_logits
from klbelt.monitor import KL_HIST_EDGES, METRICS, CSVSink, read_csv, read_jsonl, token_stats


def _batch(gen, b=4, t=9, v=30):
    logits = torch.randn(b, t, v, generator=gen)
    ref = logits + 0.3 * torch.randn(b, t, v, generator=gen)
    kl = torch.randn(b, t, generator=gen) * 0.2 + 0.05
    mask = torch.ones(b, t)
    mask[0, 5:] = 0
    mask[2, :] = 0  # an all-masked row is not a sequence
    return kl, mask, logits, ref


def test_token_stats_match_torch_reductions_on_the_valid_tokens(gen):
    kl, mask, _, _ = _batch(gen)
    s = token_stats(kl, mask)
    valid = kl[mask > 0]
    torch.testing.assert_close(s["kl"], aggregate(kl, mask, "token-mean"))
    torch.testing.assert_close(s["kl_seq"], aggregate(kl, mask, "seq-mean-token-sum"))
    torch.testing.assert_close(s["kl_max"], valid.max())
    torch.testing.assert_close(s["kl_min"], valid.min())
    q = torch.quantile(valid, torch.tensor([0.5, 0.9, 0.99]))
    torch.testing.assert_close(torch.stack([s["kl_p50"], s["kl_p90"], s["kl_p99"]]), q)
    torch.testing.assert_close(s["kl_neg_frac"], (valid < 0).float().mean())
    rows = (kl * mask).sum(-1)[mask.sum(-1) > 0]
    torch.testing.assert_close(s["kl_seq_max"], rows.max())
    assert s["tokens"] == mask.sum() and s["response_len"] == mask.sum() / 3
    assert s["kl_hist"].sum() == mask.sum() and s["kl_hist"].numel() == len(KL_HIST_EDGES) + 1


def test_empty_selection_gives_nan_not_an_error():
    s = token_stats(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.isnan(s["kl"]) and torch.isnan(s["kl_max"]) and torch.isnan(s["kl_p50"])


def test_log_step_reports_exact_kl_and_the_estimators_gap(gen):
    kl, mask, logits, ref = _batch(gen)
    rec = KLMonitor(warn=False).log_step(3, kl=kl, mask=mask, logits=logits, ref_logits=ref, kl_coef=0.1)
    exact = aggregate(kl_from_logits(logits, ref), mask, "token-mean").item()
    assert rec["step"] == 3 and rec["kl_coef"] == pytest.approx(0.1)
    assert rec["kl_exact"] == pytest.approx(exact, rel=1e-5)
    assert rec["kl_est_gap"] == pytest.approx(rec["kl"] - exact, abs=1e-6)


def test_log_step_with_a_precomputed_exact_kl_needs_no_logits(gen):
    kl, mask, logits, ref = _batch(gen)
    exact = kl_from_logits(logits, ref)
    a = KLMonitor(warn=False).log_step(0, kl=kl, mask=mask, logits=logits, ref_logits=ref)
    b = KLMonitor(warn=False).log_step(0, kl=kl, mask=mask, kl_exact=exact)
    assert a["kl_exact"] == pytest.approx(b["kl_exact"]) and a["kl_est_gap"] == pytest.approx(b["kl_est_gap"])


def test_log_step_means_rewards_and_masks_entropy(gen):
    kl, mask, _, _ = _batch(gen)
    entropy = torch.rand(*kl.shape, generator=gen)
    rec = KLMonitor(warn=False).log_step(
        0, kl=kl, mask=mask, reward=torch.tensor([1.0, 2.0, 3.0, 4.0]), gold_reward=0.5, entropy=entropy,
        distinct_2=torch.tensor(0.7), exclaim_rate=0.25,
    )
    assert rec["reward"] == 2.5 and rec["gold_reward"] == 0.5 and rec["exclaim_rate"] == 0.25
    assert rec["distinct_2"] == pytest.approx(0.7)
    assert rec["entropy"] == pytest.approx(aggregate(entropy, mask, "token-mean").item())
    assert set(rec) - {"step"} <= set(METRICS)  # every name it writes is documented with a unit


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(kl=[0.1]), TypeError, "kl must be a torch.Tensor"),
        (dict(kl=torch.ones(2, 3), mask=torch.ones(3, 2)), ValueError, "mask must have the shape of kl"),
        (dict(kl=torch.ones(2, 3), logits=torch.ones(2, 3, 4)), ValueError, "logits and ref_logits"),
        (dict(kl=torch.tensor([[float("nan")]])), ValueError, "kl .* NaN"),
        (dict(kl=torch.ones(2, 3), reward=torch.ones(2, 3, 4)), ValueError, "reward must be"),
        (dict(kl=torch.ones(2, 3), kl_coef="0.1"), TypeError, "kl_coef must be a real number"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KLMonitor(warn=False).log_step(0, **kwargs)


def test_alerts_reach_the_callback_python_warnings_and_the_log(caplog):
    got = []
    monitor = KLMonitor(on_alert=got.append)
    with caplog.at_level(logging.WARNING, logger="klbelt.monitor"), pytest.warns(KLHealthWarning, match="drifting"):
        for step in range(8):
            monitor.log_step(step, kl=torch.full((2, 4), 0.5))
    assert [a.rule for a in got] == ["kl_band"] and got[0].step == 4
    assert "drifting" in caplog.text and "step 4" in caplog.text
    assert monitor.history[4]["alerts"] == ["kl_band"]
    assert monitor.exit_code() == 1


def test_jsonl_sink_writes_one_readable_line_per_step_with_alerts(tmp_path):
    with KLMonitor(tmp_path, warn=False) as monitor:
        for step in range(8):
            monitor.log_step(step, kl=torch.full((2, 4), 0.5), kl_coef=0.2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[4])["alerts"] == ["kl_band"]
    run = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in run.records] == list(range(8))
    assert run.records[0]["kl"] == pytest.approx(0.5) and run.records[0]["kl_hist"][-1] == 0


def test_csv_sink_round_trips_and_adds_late_columns(tmp_path):
    sink = CSVSink(tmp_path / "m.csv")
    sink.write({"step": 0, "kl": 0.1})
    sink.write({"step": 1, "kl": 0.2, "reward": 1.5, "kl_hist": [1, 2]})
    sink.write({"step": 2, "kl": 0.3, "reward": 2.0})
    records = read_csv(tmp_path / "m.csv").records
    assert records == [{"step": 0, "kl": 0.1}, {"step": 1, "kl": 0.2, "reward": 1.5}, {"step": 2, "kl": 0.3, "reward": 2.0}]


def test_tensorboard_sink_is_read_back_by_tensorboards_own_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    with KLMonitor(tmp_path, sinks=["tensorboard"], warn=False) as monitor:
        for step in range(8):
            monitor.log_step(step, kl=torch.full((2, 4), 0.5), kl_coef=0.2)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={SCALARS: 0})
    acc.Reload()
    assert {"klbelt/kl", "klbelt/kl_max", "klbelt/kl_seq", "klbelt/kl_coef"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("klbelt/kl")
    assert [e.step for e in events] == list(range(8))
    assert events[0].value == pytest.approx(0.5)
    assert "klbelt/alerts/text_summary" in acc.Tags()["tensors"]  # the alert as text


def test_monitor_without_log_dir_keeps_history_in_memory_only(tmp_path):
    monitor = KLMonitor(warn=False)
    monitor.log_metrics(0, {"kl": 0.05, "reward": torch.tensor(1.0)})
    assert monitor.history == [{"step": 0, "kl": 0.05, "reward": 1.0}] and monitor.sinks == []
    with pytest.raises(ValueError, match="log_dir is needed"):
        KLMonitor(sinks=["csv"])
