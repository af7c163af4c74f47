"""Best-of-n: the exact KL against enumeration, the analytic bound, and sampling against the exact law."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from klbelt.bon import (
    best_of_n,
    best_of_n_kl,
    best_of_n_kl_estimate,
    best_of_n_probs,
    exact_best_of_n_kl,
    fit_gold_vs_kl,
    fitted_gain,
    pool_curve,
)


def enumerate_best_of_n(p: list[float], r: list[float], n: int) -> list[float]:
    """pi_bon by brute force: every n-tuple of outcomes, ties split evenly among the tied draws."""
    q = [0.0] * len(p)
    for tup in itertools.product(range(len(p)), repeat=n):
        weight = math.prod(p[i] for i in tup)
        top = max(r[i] for i in tup)
        tied = [i for i in tup if r[i] == top]
        for i in tied:
            q[i] += weight / len(tied)
    return q


def kl(q, p) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)


CASES = [
    ([0.1, 0.2, 0.3, 0.4], [3.0, 1.0, 2.0, 0.0], 3),  # distinct rewards
    ([0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 2.0, 0.0], 4),  # a tie below the top
    ([0.25, 0.05, 0.3, 0.4], [2.0, 2.0, 2.0, 0.0], 3),  # a three-way tie at the top
    ([0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 5.0, 1.0, 1.0, -1.0], 4),  # zero-probability outcomes, one with the best reward
    ([0.6, 0.4], [1.0, 1.0], 5),  # all tied: best-of-n is the reference
]


@pytest.mark.parametrize("p,r,n", CASES)
def test_exact_best_of_n_matches_enumeration_of_all_n_tuples(p, r, n):
    brute = enumerate_best_of_n(p, r, n)
    exact = best_of_n_probs(p, r, n)
    assert torch.allclose(exact, torch.tensor(brute, dtype=torch.float64), atol=1e-12)
    assert exact_best_of_n_kl(p, r, n) == pytest.approx(kl(brute, p), abs=1e-12)


def test_all_tied_rewards_give_zero_kl():
    assert exact_best_of_n_kl([0.6, 0.4], [1.0, 1.0], 7) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64, 256])
def test_exact_kl_equals_log_n_minus_n_minus_1_over_n_for_many_small_distinct_outcomes(n):
    V = 100_000  # uniform 1/V, distinct rewards: the continuous limit up to O(n/V)
    p = torch.full((V,), 1.0 / V, dtype=torch.float64)
    r = torch.randperm(V, generator=torch.Generator().manual_seed(n)).double()
    assert exact_best_of_n_kl(p, r, n) == pytest.approx(best_of_n_kl(n), abs=5e-3 * max(1.0, math.log(n)))


def test_analytic_kl_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(256) == pytest.approx(math.log(256) - 255 / 256)


def test_analytic_kl_bounds_the_exact_kl_on_random_distributions_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(150):
        V = int(torch.randint(1, 12, (1,), generator=g))
        p = torch.rand(V, generator=g, dtype=torch.float64) ** 3
        p = p / p.sum()
        r = torch.randint(0, 4 if trial % 2 else 1000, (V,), generator=g).double()
        for n in (1, 2, 5, 30, 200):
            exact = exact_best_of_n_kl(p, r, n)
            assert -1e-12 <= exact <= best_of_n_kl(n) + 1e-12
            # the tighter estimate is itself bounded by the analytic value
            assert best_of_n_kl_estimate(n, float(p[r == r.max()].sum())) <= best_of_n_kl(n) + 1e-12


@pytest.mark.parametrize("eps,n", [(0.3, 4), (0.05, 16), (0.5, 2)])
def test_tighter_estimate_is_exact_for_one_top_atom_over_a_tie_free_rest(eps, n):
    V = 50_000
    p = torch.cat([torch.tensor([eps], dtype=torch.float64), torch.full((V,), (1 - eps) / V, dtype=torch.float64)])
    r = torch.cat([torch.tensor([float(V + 1)]), torch.arange(V).double()])
    assert best_of_n_kl_estimate(n, eps) == pytest.approx(exact_best_of_n_kl(p, r, n), abs=1e-3)


def test_tighter_estimate_limits():
    assert best_of_n_kl_estimate(8, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert best_of_n_kl_estimate(8, 1e-9) == pytest.approx(best_of_n_kl(8), abs=1e-6)
    # a 24-token response's probability (~e^-50) or one that underflowed to 0: the analytic value, no NaN
    assert best_of_n_kl_estimate(64, math.exp(-50.0)) == pytest.approx(best_of_n_kl(64), abs=1e-12)
    assert best_of_n_kl_estimate(64, 0.0) == best_of_n_kl(64)


@pytest.mark.parametrize("L", [10, 100])
def test_tighter_estimate_tracks_the_exact_kl_of_a_uniform_reference_while_the_bound_does_not(L):
    """Beirami et al.'s synthetic check: uniform over L outcomes, distinct rewards; every kept outcome has eps = 1/L."""
    p = torch.full((L,), 1.0 / L, dtype=torch.float64)
    r = torch.arange(L).double()
    for n in (2, 4, 16, 64, 256, 1024):
        exact = exact_best_of_n_kl(p, r, n)
        assert best_of_n_kl_estimate(n, 1.0 / L) == pytest.approx(exact, abs=0.025)
    # the bound keeps growing with n; the true KL saturates at log L, and so does the estimate
    assert best_of_n_kl(1024) - exact_best_of_n_kl(p, r, 1024) > 1.0
    assert best_of_n_kl_estimate(1024, 1.0 / L) == pytest.approx(math.log(L), abs=1e-3)


def test_mean_tighter_estimate_over_kept_outcomes_is_at_least_the_exact_kl():
    """E over y ~ best-of-n of KL_hat(n, p(y)) >= KL on random tie-free references (the paper's conjecture; exact sums here)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        V = int(torch.randint(2, 20, (1,), generator=g))
        p = torch.rand(V, generator=g, dtype=torch.float64) ** 4
        p = p / p.sum()
        r = torch.randperm(V, generator=g).double()
        for n in (2, 5, 30, 200):
            q = best_of_n_probs(p, r, n)
            mean_estimate = sum(float(q[i]) * best_of_n_kl_estimate(n, float(p[i])) for i in range(V))
            assert exact_best_of_n_kl(p, r, n) - 1e-12 <= mean_estimate <= best_of_n_kl(n) + 1e-12


@pytest.mark.parametrize("bad", [0, -3])
def test_n_below_one_is_a_value_error_naming_n(bad):
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
        best_of_n_kl(bad)
    with pytest.raises(ValueError, match=r"n must be"):
        exact_best_of_n_kl([0.5, 0.5], [0, 1], bad)


@pytest.mark.parametrize("bad", [2.0, 2.5, "4", True, None])
def test_non_integer_n_is_a_type_error_naming_n(bad):
    with pytest.raises(TypeError, match=r"n must be an integer"):
        best_of_n_kl(bad)


def test_mismatched_lengths_and_unnormalised_probabilities_are_rejected():
    with pytest.raises(ValueError, match=r"same length, got 3 and 2"):
        exact_best_of_n_kl([0.2, 0.3, 0.5], [1.0, 2.0], 2)
    with pytest.raises(ValueError, match=r"must sum to 1 \(tolerance 1e-06\), got 0\.9"):
        exact_best_of_n_kl([0.2, 0.2, 0.5], [1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match=r"ref_probs must be >= 0"):
        exact_best_of_n_kl([1.2, -0.2], [1.0, 2.0], 2)
    for bad_eps in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eps must be a probability in \[0, 1\], got"):
            best_of_n_kl_estimate(3, bad_eps)


def test_pool_curve_matches_the_exact_law_of_each_prompt_pool():
    proxy = torch.tensor([[0.0, 1.0, 1.0, 3.0], [2.0, 2.0, 0.0, -1.0]])
    gold = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 1.5, 0.0, 0.0]])
    row = pool_curve(proxy, gold, [3])[0]
    u = [0.25] * 4
    q0, q1 = enumerate_best_of_n(u, proxy[0].tolist(), 3), enumerate_best_of_n(u, proxy[1].tolist(), 3)
    assert row["reward"] == pytest.approx((sum(a * b for a, b in zip(q0, proxy[0].tolist())) + sum(a * b for a, b in zip(q1, proxy[1].tolist()))) / 2)
    assert row["gold_reward"] == pytest.approx((sum(a * b for a, b in zip(q0, gold[0].tolist())) + sum(a * b for a, b in zip(q1, gold[1].tolist()))) / 2)
    assert row["kl_nats_per_seq"] == pytest.approx((kl(q0, u) + kl(q1, u)) / 2)


def test_gao_forms_recover_known_coefficients():
    kl_ = torch.linspace(0.1, 9.0, 40, dtype=torch.float64)
    d = kl_.sqrt()
    bon = fit_gold_vs_kl(kl_, d * (0.7 - 0.2 * d), "bon")
    rl = fit_gold_vs_kl(kl_, d * (0.5 - 0.3 * d.log()), "rl")
    assert (bon["alpha"], bon["beta"]) == pytest.approx((0.7, 0.2), abs=1e-9)
    assert (rl["alpha"], rl["beta"]) == pytest.approx((0.5, 0.3), abs=1e-9)
    assert fitted_gain(rl, kl_).allclose(d * (0.5 - 0.3 * d.log()))


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}  # 0.999 quantiles


@pytest.mark.slow
def test_best_of_n_on_a_toy_categorical_model_follows_the_exact_law():
    """Best-of-3 of one-token responses from a tiny GPT-2: the kept tokens' counts against pi_bon (chi-square)."""
    from tiny_models import tiny_gpt2, word_tokenizer

    words = ["a", "bb", "cc", "ddd", "e", "ffff", "gg"]
    tok = word_tokenizer(words)
    model = tiny_gpt2(len(words) + 2, n_embd=32, seed=3)
    with torch.no_grad():  # make the reference far from uniform
        model.lm_head.weight.mul_(torch.linspace(0.5, 8.0, model.lm_head.weight.shape[0])[:, None])
    prompt = "a bb"
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].double()
    logits[tok.eos_token_id] = float("-inf")  # block_eos removes EOS from the reference
    ref = torch.softmax(logits, -1)
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(ref.shape[0])]
    reward = lambda ts: torch.tensor([float(len(t)) for t in ts])  # noqa: E731  (ties: bb, cc, gg)
    expected = best_of_n_probs(ref, reward(texts), 3)
    P = 3000
    out = best_of_n(model, tok, [prompt] * P, 3, reward, max_new_tokens=1, block_eos=True, batch_size=3000, seed=7)
    counts = torch.zeros_like(expected)
    for t in out.texts:
        counts[texts.index(t)] += 1
    keep = expected * P > 5
    stat = float(((counts[keep] - P * expected[keep]) ** 2 / (P * expected[keep])).sum())
    assert stat < CHI2_999[int(keep.sum()) - 1], (counts.tolist(), (P * expected).tolist())
    assert counts[~keep].sum() <= 10
    assert out.kl_bound == pytest.approx(best_of_n_kl(3))
    assert 0.0 <= out.kl_estimate <= out.kl_bound
    assert out.proxy.shape == (P,) and torch.isnan(out.gold).all()


@pytest.mark.slow
def test_best_of_n_kl_estimate_is_the_mean_of_beirami_estimate_at_the_kept_response_probability():
    """Tie-free reward on one-token responses: kl_estimate against sum_y pi_bon(y) KL_hat(n, pi_ref(y)), exactly."""
    from tiny_models import tiny_gpt2, word_tokenizer

    words = ["a", "bb", "cc", "ddd", "e", "ffff", "gg"]
    tok = word_tokenizer(words)
    model = tiny_gpt2(len(words) + 2, n_embd=32, seed=3)
    with torch.no_grad():  # peaked: "gg", the most rewarded, has 2/3 of the mass, so the estimate is far below the bound
        model.lm_head.weight.mul_(torch.linspace(0.5, 20.0, model.lm_head.weight.shape[0])[:, None])
    enc = tok(["a bb"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].double()
    logits[tok.eos_token_id] = float("-inf")
    ref = torch.softmax(logits, -1)
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(ref.shape[0])]  # <eos>, <pad> -> ""
    rank = {w: float(v) for w, v in zip(words, [0, 5, 3, 2, 4, 1, 6])}
    reward = lambda ts: torch.tensor([rank.get(t, -1.0) for t in ts])  # noqa: E731  (distinct: eos is never drawn)
    n, P = 4, 3000
    q = best_of_n_probs(ref, reward(texts), n)
    expected = sum(float(q[i]) * best_of_n_kl_estimate(n, float(ref[i])) for i in range(ref.shape[0]) if ref[i] > 0)
    out = best_of_n(model, tok, ["a bb"] * P, n, reward, max_new_tokens=1, block_eos=True, batch_size=3000, seed=11)
    assert float(ref[words.index("gg")]) > 0.6 and expected < 0.6 * out.kl_bound
    assert out.kl_estimate == pytest.approx(expected, abs=0.01)  # Monte Carlo over P prompts: sd of the mean ~0.001
    assert exact_best_of_n_kl(ref, reward(texts), n) == pytest.approx(expected, abs=0.01)  # and it tracks the true KL


def _write_run(folder, kl_seq, gold, kl_coef=0.0):
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": i, "kl_seq": k, "gold_reward": g, "kl_coef": kl_coef}) for i, (k, g) in enumerate(zip(kl_seq, gold))]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_frontier_fits_both_forms_and_finds_where_the_curves_cross(tmp_path):
    """Synthetic curves on Gao et al.'s forms: the fits recover them and the crossing matches bisection."""
    from klbelt.monitor.frontier import frontier, read_bon, rl_curve

    ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    bon_rows = [{"n": n, "kl_nats_per_seq": best_of_n_kl(n), "reward": 0.0,
                 "gold_reward": 0.1 + math.sqrt(best_of_n_kl(n)) * (0.5 - 0.1 * math.sqrt(best_of_n_kl(n)))} for n in ns]
    (tmp_path / "bon.json").write_text(json.dumps({"rows": bon_rows}))
    kls = [0.0] + [0.05 * 1.1**i for i in range(50)]  # up to ~5 nats/seq
    gold = [0.1 + (math.sqrt(k) * (0.2 - 0.3 * math.log(math.sqrt(k))) if k > 0 else 0.0) for k in kls]
    _write_run(tmp_path / "rl", kls, gold)
    run = rl_curve(tmp_path / "rl", window=1)
    fits = frontier(read_bon(tmp_path / "bon.json"), [run])
    assert (fits["bon"]["alpha"], fits["bon"]["beta"]) == pytest.approx((0.5, 0.1), abs=1e-9)
    assert (fits["rl"]["alpha"], fits["rl"]["beta"]) == pytest.approx((0.2, 0.3), abs=1e-9)
    # independent truth: 0.5 - 0.1 d = 0.2 - 0.3 log d, by bisection on d
    lo, hi = 0.1, 1.0  # g(0.1) > 0 > g(1)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (0.2 - 0.3 * math.log(mid)) - (0.5 - 0.1 * mid) > 0 else (lo, mid)
    assert len(fits["crossings"]) == 1
    assert fits["crossings"][0] == pytest.approx(lo**2, abs=0.02)
    assert fits["rl_ahead_at_max_kl"] is False


def test_plot_frontier_rejects_a_run_without_kl_seq(tmp_path, capsys):
    from klbelt.cli.main import main

    (tmp_path / "bon.json").write_text(json.dumps({"rows": [{"n": 1, "kl_nats_per_seq": 0.0, "reward": 0.0, "gold_reward": 0.0}]}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 0, "kl": 0.1, "gold_reward": 0.2}) + "\n")
    assert main(["plot", "frontier", str(tmp_path / "run"), "--bon", str(tmp_path / "bon.json"), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "no kl_seq" in err and "metrics.jsonl" in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--n", "0,2"], "--n must be comma-separated integers >= 1, got '0,2'"),
    (["--n", "2.5"], "--n must be comma-separated integers >= 1, got '2.5'"),
    (["--n", "1,8", "--pool", "4"], "--pool (4) must be >= the largest n (8)"),
])
def test_klbelt_bon_rejects_bad_n_and_pool_before_loading_a_model(tmp_path, capsys, argv, message):
    from klbelt.cli.main import main

    try:
        code = main(["bon", "--model", "tiny", "--out", str(tmp_path / "out"), *argv])
    except SystemExit as e:  # argparse's usage error
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "bon.json").exists()


@pytest.mark.slow
def test_klbelt_bon_and_plot_frontier_end_to_end_on_the_tiny_model(tmp_path, capsys):
    from klbelt.cli.main import main

    assert main(["bon", "--model", "tiny", "--n", "1,2,4", "--prompts", "1", "--pool", "4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bon.json").read_text())
    assert [r["n"] for r in data["rows"]] == [1, 2, 4]
    assert {"n", "kl_nats_per_seq", "reward", "gold_reward"} <= set(data["rows"][0])
    assert data["rows"][0]["kl_nats_per_seq"] == pytest.approx(0.0, abs=1e-12)
    for r in data["rows"]:
        assert 0.0 <= r["kl_nats_per_seq"] <= best_of_n_kl(r["n"]) + 1e-9
    rewards = [r["reward"] for r in data["rows"]]
    assert rewards == sorted(rewards)  # best-of-n's expected proxy never falls with n
    _write_run(tmp_path / "rl", [0.0, 0.5, 1.0, 2.0, 4.0], [0.0, 0.05, 0.08, 0.1, 0.09], kl_coef=0.1)
    out = tmp_path / "f.png"
    assert main(["plot", "frontier", str(tmp_path / "rl"), "--bon", str(tmp_path / "bon.json"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best-of-n: gold gain = d (alpha - beta d)" in capsys.readouterr().out


def test_docs_best_of_n_example_prints_what_it_says():
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "best-of-n.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    claimed = re.findall(r"# (\d\.\d{4})", code)
    assert out == claimed
