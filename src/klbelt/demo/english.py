"""The English demo task: SmolLM2-135M-Instruct continues neutral everyday openings.

Prompts
    ``english_prompts.txt`` (shipped): 320 short openings written for klbelt, each neutral to VADER
    (compound exactly 0), ending mid-sentence ("On Tuesday morning the bus to the station").
    The last ``N_EVAL`` are held out for the before/after samples; the rest train.

Proxy reward
    VADER compound of the raw continuation (``klbelt.demo.rewards.proxy_reward``): hackable by
    "!" (up to four), CAPITALS, boosters and by piling up positive words.

Gold reward
    The same judge as the fortune demo (``klbelt.demo.rewards``: sentiment of the normalised text,
    discounted by repetition, sentiment-word density and the reference model's NLL per token),
    with thresholds measured for SmolLM2 on these prompts by ``python -m klbelt.demo.calibrate_english``
    (numbers in ``ENGLISH_JUDGE``'s comments). The trainer never sees it.
"""

from __future__ import annotations

import functools
from importlib import resources

from .rewards import GoldJudge, gold_reward

N_EVAL = 16

# Measured by `python -m klbelt.demo.calibrate_english` (see that module's docstring).
ENGLISH_JUDGE = GoldJudge(
    distinct_ok=0.70,
    distinct_bad=0.40,
    density_ok=0.20,
    density_bad=0.40,
    min_words=16,
    nll_ok=3.8,
    nll_bad=6.0,
)


@functools.lru_cache(maxsize=1)
def _all_prompts() -> tuple[str, ...]:
    text = resources.files("klbelt.demo").joinpath("english_prompts.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def english_prompts(split: str = "train") -> list[str]:
    """The shipped openings: ``"train"`` (all but the last ``N_EVAL``) or ``"eval"`` (the last ``N_EVAL``)."""
    prompts = _all_prompts()
    if split == "train":
        return list(prompts[:-N_EVAL])
    if split == "eval":
        return list(prompts[-N_EVAL:])
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def english_gold_reward(texts, ref_nll=None):
    """Gold reward of English continuations, float32 [B] in [-1, 1] (``ENGLISH_JUDGE``'s thresholds)."""
    return gold_reward(texts, ref_nll, judge=ENGLISH_JUDGE)
