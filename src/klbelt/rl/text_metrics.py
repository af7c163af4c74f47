"""Failure-mode metrics on generated text: emphasis and repetition."""

from __future__ import annotations


def exclaim_rate(texts: list[str]) -> float:
    """Exclamation marks per 100 characters over the whole batch."""
    chars = sum(len(t) for t in texts)
    return 100.0 * sum(t.count("!") for t in texts) / max(chars, 1)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams across the batch (1.0 = no repetition)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
