"""Failure-mode metrics on generated text: emphasis and repetition."""

from __future__ import annotations

from collections.abc import Sequence


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    return list(texts)


def exclaim_rate(texts: Sequence[str]) -> float:
    """ "!" per 100 characters over the whole batch: 100 * sum(count "!") / sum(len); 0.0 if empty."""
    texts = _check_texts(texts)
    chars = sum(len(t) for t in texts)
    return 100.0 * sum(t.count("!") for t in texts) / chars if chars else 0.0


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n across the batch: unique word n-grams / all word n-grams (1.0 = no repetition).

    Words are whitespace-separated; n-grams are taken within each text, never
    across two. 0.0 when the batch has no n-gram at all.
    """
    texts = _check_texts(texts)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
