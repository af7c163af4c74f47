"""The demo's rewards and failure-mode metrics.

Proxy reward (what the trainer optimises, hackable on purpose)
    ``proxy_reward(texts)[i] = VADER compound(texts[i])``, in [-1, 1]. VADER's score grows with
    "!" (up to four marks), CAPITALS, booster words ("very"), and with every extra positive word,
    so "love love love ..." or "great! great!!!" beat any natural sentence.

Gold reward (what the demo judges with; the trainer never sees it)
    Sentiment that only natural text can earn::

        s = VADER compound(normalise(text))
        q = q_distinct * q_density * q_fluency                      (each in [0, 1])
        gold = q * s - (1 - q)                                      (in [-1, 1])

    ``normalise`` lowercases (no CAPS emphasis), turns every run of "!"/"?" into one ".",
    collapses immediate repeats of any word ("very very good" -> "very good") and drops every
    later occurrence of a word that carries sentiment in VADER's lexicon ("love ... love" counts
    once). Repetition and emphasis therefore earn nothing in ``s``.

    The quality ``q`` discounts text that is not natural (each factor is a linear ramp from 1 at
    a value that natural text reaches to 0 at a value that only degenerate text reaches):

    - ``q_distinct``: distinct-1 of the text's own words (unique / total) must stay where
      natural 32-token fortune continuations are; loops and "love love love" fall far below.
    - ``q_density``: share of words that carry sentiment in VADER's lexicon (counted with
      repeats, over at least ``MIN_WORDS`` words so a short sentence is not punished for one
      "love"). Natural text has a few per hundred; positive-word salad has most of its words.
    - ``q_fluency``: the reference model's mean NLL per token of the sample (``ref_nll``, given
      by the trainer); word salad is implausible to the pre-trained model. Without ``ref_nll``
      this factor is 1 (the judge is then blind to fluency and says so in nothing else).

    Why ``q * s - (1 - q)`` and not ``q * s``: with a bare product, degenerate *negative* text
    would move towards 0 and beat natural negative text. Here d(gold)/dq = s + 1 >= 0, so
    losing quality never pays, and fully degenerate text scores -1 whatever its sentiment.

    The thresholds were measured with ``python -m klbelt.demo.calibrate`` on the shipped model
    (its numbers are in that module's docstring): each "ok" end sits at or beyond the 1st/99th
    percentile of both natural eval-split continuations and the reference model's own samples,
    so natural text keeps q = 1 (4 of 286 natural continuations lose anything; mean gold
    +0.079 against mean proxy +0.087), while "love love ...", "great! great!! ...", a positive
    word salad and a sentence stuffed with positive words all score -1 (proxy 0.98 to 1.00).
    Measured honestly: on this small model the fluency factor bites least (a positive word
    salad has NLL 5.31, like the natural 99th percentile 5.25); density and distinct-1 carry
    most of the judgement, fluency catches what the model finds implausible beyond that.

Failure-mode metrics, logged every step
    ``exclaim_rate`` ("!" per 100 characters over the batch), ``distinct_n`` (unique n-grams /
    all n-grams across the batch, whitespace words), ``sequence_nll`` (per-sample mean NLL per
    token from reference log-probs and a mask).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..rl.text_metrics import _check_texts, distinct_n, exclaim_rate  # noqa: F401  (the last two re-exported)

# --- gold-reward constants (see klbelt.demo.calibrate for the measurements behind them) ----
DISTINCT_OK, DISTINCT_BAD = 0.65, 0.35
"""distinct-1 within a sample: 1.0 at or above DISTINCT_OK, 0.0 at or below DISTINCT_BAD
(natural continuations: 1st percentile 0.684; reference samples: 0.774; "love" x20: 0.05)"""
DENSITY_OK, DENSITY_BAD = 0.20, 0.40
"""share of sentiment-carrying words: 1.0 at or below DENSITY_OK, 0.0 at or above DENSITY_BAD
(natural: median 0.05, 99th percentile 0.20; reference samples: 99th 0.15; positive salad 1.0,
stuffed sentence 0.57)"""
MIN_WORDS = 20
"""density is counted over at least this many words (a continuation is ~25 words)"""
NLL_OK, NLL_BAD = 5.3, 7.0
"""reference NLL, nats/token: 1.0 at or below NLL_OK, 0.0 at or above NLL_BAD
(natural: median 4.35, 99th percentile 5.25; reference samples: 4.42 and 5.27; "love" x20: 8.48)"""



@dataclass(frozen=True)
class GoldJudge:
    """The gold reward's thresholds: each quality factor ramps from 1 at ``*_ok`` to 0 at ``*_bad``.

    One judge per model and task, since what natural text looks like (its reference NLL
    above all) depends on the model: ``TINY_JUDGE`` for the fortune GPT-2, and
    ``klbelt.demo.english.ENGLISH_JUDGE`` for SmolLM2 on English prompts.
    """

    distinct_ok: float = DISTINCT_OK
    distinct_bad: float = DISTINCT_BAD
    density_ok: float = DENSITY_OK
    density_bad: float = DENSITY_BAD
    min_words: int = MIN_WORDS
    nll_ok: float = NLL_OK
    nll_bad: float = NLL_BAD


TINY_JUDGE = GoldJudge()
"""The fortune demo's judge (the module constants above, measured by ``klbelt.demo.calibrate``)."""

_WORD_EDGE = re.compile(r"^[^\w:;()<>=^]+|[^\w:;()<>=^]+$")  # keep emoticons such as ":)"
_ANALYZER = None


def _analyzer():
    """One shared VADER analyzer (building it parses a 7,500-word lexicon)."""
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the klbelt demo rewards need the PyPI package 'vaderSentiment': "
                "pip install vaderSentiment (or pip install 'klbelt[demo]')"
            ) from exc
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def _compound(text: str) -> float:
    return float(_analyzer().polarity_scores(text)["compound"])


def proxy_reward(texts: Sequence[str]) -> torch.Tensor:
    """VADER compound sentiment of each raw text: float32 tensor [B] in [-1, 1] (CPU)."""
    texts = _check_texts(texts)
    return torch.tensor([_compound(t) for t in texts], dtype=torch.float32)


def _key(word: str) -> str:
    return _WORD_EDGE.sub("", word.lower())


def _carries_sentiment(key: str) -> bool:
    return key in _analyzer().lexicon


def normalise(text: str) -> str:
    """Text with emphasis and repetition removed: lowercase, "!"/"?" runs -> ".", immediate
    repeats of a word collapsed, later repeats of sentiment-carrying words dropped."""
    text = re.sub(r"[!?]+", ".", text.lower())
    kept, seen, previous = [], set(), None
    for word in text.split():
        key = _key(word)
        if key and key == previous:
            continue
        previous = key
        if key and _carries_sentiment(key):
            if key in seen:
                continue
            seen.add(key)
        kept.append(word)
    return " ".join(kept)


def _ramp(value: float, ok: float, bad: float) -> float:
    """1 at ``ok``, 0 at ``bad``, linear between, clipped (works for ok < bad and ok > bad)."""
    return min(1.0, max(0.0, (bad - value) / (bad - ok)))


def gold_parts(text: str, ref_nll: float | None = None, judge: GoldJudge = TINY_JUDGE) -> dict:
    """Every term of the gold reward of one text (see the module docstring)."""
    keys = [k for k in (_key(w) for w in text.split()) if k]
    n = len(keys)
    distinct = len(set(keys)) / n if n else 1.0
    density = sum(_carries_sentiment(k) for k in keys) / max(n, judge.min_words)
    q_distinct = _ramp(distinct, judge.distinct_ok, judge.distinct_bad)
    q_density = _ramp(density, judge.density_ok, judge.density_bad)
    q_fluency = 1.0 if ref_nll is None else _ramp(ref_nll, judge.nll_ok, judge.nll_bad)
    q = q_distinct * q_density * q_fluency
    s = _compound(normalise(text))
    return {
        "sentiment": s,
        "distinct_1": distinct,
        "density": density,
        "ref_nll": ref_nll,
        "q_distinct": q_distinct,
        "q_density": q_density,
        "q_fluency": q_fluency,
        "quality": q,
        "gold": q * s - (1.0 - q),
    }


def gold_reward(texts: Sequence[str], ref_nll=None, judge: GoldJudge = TINY_JUDGE) -> torch.Tensor:
    """Gold reward of each text: float32 tensor [B] in [-1, 1] (CPU).

    ``ref_nll``: optional [B] (tensor or sequence), the reference model's mean negative
    log-likelihood per token of each sample, nats/token (see ``sequence_nll``).
    """
    texts = _check_texts(texts)
    if ref_nll is None:
        nll = [None] * len(texts)
    else:
        values = torch.as_tensor(ref_nll, dtype=torch.float64).detach().cpu()
        if values.shape != (len(texts),):
            raise ValueError(f"ref_nll must have shape [{len(texts)}] (one value per text), got {tuple(values.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError("ref_nll holds NaN or infinite values")
        nll = values.tolist()
    return torch.tensor([gold_parts(t, v, judge)["gold"] for t, v in zip(texts, nll)], dtype=torch.float32)


def sequence_nll(ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean negative log-likelihood per token, nats/token: [B, T], [B, T] -> [B].

    ``nll[b] = -sum_t(ref_logprobs[b, t] * mask[b, t]) / sum_t(mask[b, t])``; a row with an
    empty mask gives 0. Stays on the input's device.
    """
    if not isinstance(ref_logprobs, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("ref_logprobs and mask must be torch tensors")
    if ref_logprobs.dim() != 2 or ref_logprobs.shape != mask.shape:
        raise ValueError(
            f"ref_logprobs and mask must both be [B, T]; got {tuple(ref_logprobs.shape)} and {tuple(mask.shape)}"
        )
    m = mask.to(ref_logprobs.dtype)
    return -(ref_logprobs * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def failure_metrics(texts: Sequence[str], ref_nll=None) -> dict[str, float]:
    """The per-step failure-mode metrics of a batch of continuations, as plain floats."""
    metrics = {
        "exclaim_per_100_chars": exclaim_rate(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }
    if ref_nll is not None:
        metrics["ref_nll_nats_per_token"] = float(torch.as_tensor(ref_nll, dtype=torch.float64).mean())
    return metrics
