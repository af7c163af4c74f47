"""Proxy and gold rewards and the failure-mode metrics of the demo."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vaderSentiment")
from klbelt.demo import rewards  # noqa: E402
from klbelt.demo.rewards import (  # noqa: E402
    distinct_n,
    exclaim_rate,
    failure_metrics,
    gold_parts,
    gold_reward,
    proxy_reward,
    sequence_nll,
)

# Natural positive sentences (about the length of a 32-token continuation).
NATURAL_POSITIVE = [
    "It was a lovely morning, and the old man smiled as he walked his dog along the river to the market.",
    "She was glad to see her friends again after the long winter, and they talked until the sun came up.",
    "The best thing about a small town is that everyone knows your name and helps when you need it.",
]
NATURAL_NEGATIVE = [
    "The rain ruined the picnic, the car broke down on the way home, and nobody answered the phone all night.",
]
# Degenerate texts that the proxy loves (see klbelt.demo.calibrate for their measurements).
REPEATED = " ".join(["love"] * 20)
EXCLAIMED = "great! great!! great!!! great!!!! great! great!! great!!! great!!!! great! great!!"
SALAD = ("love happy great wonderful best good nice beautiful joy amazing excellent fun kind sweet win "
         "perfect glad smile hope friend")
LOOP = "i love you and you love me i love you and you love me i love you and you love me"


def test_proxy_is_vader_compound_and_grows_with_exclamation_and_repetition():
    plain, shouted, repeated = proxy_reward(["I love it", "I love it!!!", "love love love love"]).tolist()
    assert plain == pytest.approx(0.6369, abs=1e-4)  # VADER's own value
    assert shouted > plain and repeated > shouted
    assert proxy_reward([]).shape == (0,)


def test_degenerate_texts_beat_natural_ones_on_the_proxy():
    assert proxy_reward([REPEATED, EXCLAIMED, SALAD, LOOP]).min() > proxy_reward(NATURAL_POSITIVE).max()


def test_normalise_removes_emphasis_and_repetition():
    assert rewards.normalise("GREAT!!! Very very good? love, love and LOVE") == "great. very good. love, and"


def test_natural_sentences_keep_their_sign_and_most_of_their_value():
    proxy = proxy_reward(NATURAL_POSITIVE + NATURAL_NEGATIVE)
    gold = gold_reward(NATURAL_POSITIVE + NATURAL_NEGATIVE, ref_nll=[rewards.NLL_OK] * 4)
    assert (gold.sign() == proxy.sign()).all()
    assert (gold.abs() >= 0.8 * proxy.abs()).all()


@pytest.mark.parametrize("text", [REPEATED, EXCLAIMED, LOOP])
def test_repetition_and_exclamation_score_far_below_natural_text_even_without_the_model(text):
    assert proxy_reward([text]).item() > 0.95
    assert gold_reward([text]).item() < -0.5
    assert gold_reward([text]).item() < gold_reward(NATURAL_POSITIVE).min() - 1.0


def test_positive_word_salad_is_caught_by_density_alone():
    assert gold_reward([SALAD]).item() == pytest.approx(-1.0)


def test_implausible_text_loses_its_reward_as_reference_nll_rises():
    text = NATURAL_POSITIVE[0]
    ok, mid, bad = gold_reward([text] * 3, ref_nll=[rewards.NLL_OK, (rewards.NLL_OK + rewards.NLL_BAD) / 2, rewards.NLL_BAD])
    assert ok > mid > bad == pytest.approx(-1.0)


def test_losing_quality_never_pays_even_for_negative_text():
    text = NATURAL_NEGATIVE[0]
    nll = torch.linspace(rewards.NLL_OK, rewards.NLL_BAD, 9)
    gold = gold_reward([text] * 9, ref_nll=nll)
    assert (gold.diff() <= 0).all() and gold[-1] == pytest.approx(-1.0)
    parts = gold_parts(text, rewards.NLL_OK)
    assert parts["gold"] == pytest.approx(parts["quality"] * parts["sentiment"] - (1 - parts["quality"]))


def test_gold_reward_rejects_ref_nll_of_the_wrong_shape_or_nan():
    with pytest.raises(ValueError, match=r"ref_nll must have shape \[2\]"):
        gold_reward(["a", "b"], ref_nll=[1.0])
    with pytest.raises(ValueError, match="NaN"):
        gold_reward(["a"], ref_nll=[float("nan")])
    with pytest.raises(TypeError, match="list of strings"):
        gold_reward("a single string")


def test_exclaim_rate_counts_marks_per_100_characters_of_the_batch():
    assert exclaim_rate(["ab!!", "cdefgh!!!!"]) == pytest.approx(100 * 6 / 14)
    assert exclaim_rate([]) == 0.0 and exclaim_rate([""]) == 0.0


def test_distinct_n_counts_unique_ngrams_across_the_batch_within_each_text():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab | ab bc -> 3 unique of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["b a", "b"], 2) == 1.0  # no bigram "a b" across the two texts
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_sequence_nll_is_the_masked_mean_of_minus_log_probs():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert sequence_nll(logp, mask).tolist() == pytest.approx([1.5, 2.25])
    assert sequence_nll(logp, torch.zeros_like(mask)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_nll(logp, mask[:, :2])


def test_failure_metrics_bundle_the_batch_metrics():
    m = failure_metrics(["a b!", "a c"], ref_nll=torch.tensor([3.0, 5.0]))
    assert m == pytest.approx({"exclaim_per_100_chars": 100 / 7, "distinct_1": 3 / 4, "distinct_2": 1.0,
                               "ref_nll_nats_per_token": 4.0})


def test_with_the_shipped_reference_model_natural_text_keeps_its_reward_and_degenerate_text_loses_it():
    pytest.importorskip("transformers")
    from klbelt.demo import load_demo_model
    from klbelt.demo.calibrate import DEGENERATE, ref_nll_of
    from klbelt.demo.corpus import load_fortunes

    model, tok = load_demo_model()
    prompts, natural = [], []
    for entry in load_fortunes("eval"):
        ids = tok.encode(entry, add_special_tokens=False)
        if entry[0].isalpha() and len(ids) >= 38:
            prompts.append(tok.decode(ids[:6]))
            natural.append(tok.decode(ids[6:38]))
    prompts, natural = prompts[:64], natural[:64]
    nll = ref_nll_of(model, tok, prompts, natural)
    assert rewards.NLL_OK > nll.quantile(0.95)  # natural text sits well inside the "ok" zone
    gold, proxy = gold_reward(natural, ref_nll=nll), proxy_reward(natural)
    assert (gold - proxy).abs().mean() < 0.03
    degenerate = [t for name, t in DEGENERATE.items() if name != "caps and marks"]
    d_nll = ref_nll_of(model, tok, prompts[:1] * len(degenerate), [" " + t for t in degenerate])
    assert (proxy_reward(degenerate) > 0.95).all()
    assert (gold_reward(degenerate, ref_nll=d_nll) < -0.9).all()
