"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def comma_floats(text: str) -> list[float]:
    """``"0,0.01,0.1"`` -> ``[0.0, 0.01, 0.1]`` (an argparse ``type``)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def seed_list(text: str) -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"0,2,5"`` -> ``[0, 2, 5]`` (an argparse ``type``)."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds as 'A-B' or a comma list of ints, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one seed >= 0, got {text!r}")
    return seeds
