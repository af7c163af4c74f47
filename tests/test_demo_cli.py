"""`klbelt demo` and `klbelt sweep` end to end on the shipped model (a few steps)."""

from __future__ import annotations

import json

import pytest

from klbelt.cli.main import main

DEMO_KEYS = ("step", "kl", "kl_max", "kl_seq", "kl_coef", "reward", "gold_reward", "entropy", "exclaim_rate", "distinct_2")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_every_file(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--out", str(out), "--steps", "3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in DEMO_KEYS:
        assert all(key in r for r in records), key
    for name in ("samples.jsonl", "config.json", "checkpoint.pt", "report.html", "summary.json", "policy/config.json"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "Before training" in printed and "After training" in printed and "Verdict:" in printed
    # resuming a finished run writes nothing twice
    assert main(["demo", "--model", "tiny", "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_sweep_writes_the_beta_table(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "tiny", "--betas", "0,1", "--steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["beta"] for r in rows] == [0.0, 1.0]
    for key in ("beta", "reward", "gold_reward", "kl", "exclaim_rate", "distinct_2", "verdict"):
        assert all(key in r for r in rows), key


def test_sweep_rejects_bad_betas(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage line + one error line, exit 2
        main(["sweep", "--betas", "0,-1"])
    assert exit_info.value.code == 2
    assert "argument --betas: betas must be finite numbers >= 0, got '0,-1'" in capsys.readouterr().err


def _history(proxy, gold, kl=0.05):
    return [{"step": i, "reward": p, "gold_reward": g, "kl": kl, "kl_seq": kl * 24, "kl_coef": 0.1, "exclaim_rate": 0.0,
             "distinct_2": 0.9, "ref_nll": 3.0, "entropy": 2.0} for i, (p, g) in enumerate(zip(proxy, gold))]


def test_verdict_says_inconclusive_when_the_runs_own_noise_hides_the_trend():
    import random

    from klbelt.demo.task import summarise, verdict

    rng = random.Random(0)
    trend = [0.1 + 0.01 * i for i in range(36)]  # +0.3 over the run
    quiet = _history([t + rng.gauss(0, 0.02) for t in trend], [t + rng.gauss(0, 0.02) for t in trend])
    assert verdict(summarise(quiet), quiet).startswith("improving: proxy +0.")
    # no trend under noise of sd 0.3 per update: a confident word would be a guess, and the old point reading
    # (history=None) guessed often
    words_new, words_old = [], []
    for _ in range(40):
        noisy = _history([0.1 + rng.gauss(0, 0.3) for _ in range(36)], [0.1 + rng.gauss(0, 0.3) for _ in range(36)])
        words_new.append(verdict(summarise(noisy), noisy).split(":")[0])
        words_old.append(verdict(summarise(noisy)).split(":")[0])
    confident = ("improving", "reward hacking", "getting worse", "proxy up, gold unclear")
    assert sum(w in confident for w in words_new) <= 8, words_new
    assert sum(w.startswith("inconclusive") for w in words_new) >= 28, words_new
    assert sum(w in confident for w in words_old) >= 10, words_old
    flat = _history([0.1 + rng.gauss(0, 0.02) for _ in range(36)], [0.1 + rng.gauss(0, 0.02) for _ in range(36)])
    assert verdict(summarise(flat), flat).startswith("little change")
    hacked = _history(trend, [0.3 - 0.01 * i + rng.gauss(0, 0.02) for i in range(36)])
    assert verdict(summarise(hacked), hacked).startswith("reward hacking")
    assert verdict(summarise(quiet[:4]), quiet[:4]).startswith("inconclusive: 4 updates are too few")


def test_change_interval_covers_the_true_shift_about_95_percent_of_the_time():
    import random

    from klbelt.demo.task import change

    rng = random.Random(1)
    covered = 0
    for trial in range(200):
        h = [{"reward": (0.2 if i >= 30 else 0.0) + rng.gauss(0, 0.1)} for i in range(36)]
        c = change(h, "reward", 6, n_boot=400, seed=trial)
        covered += c["lo"] <= 0.2 <= c["hi"]
    # a percentile bootstrap over 6 values per window is a little narrow; it must not be far off 95%
    assert 0.85 <= covered / 200 <= 0.99, covered
