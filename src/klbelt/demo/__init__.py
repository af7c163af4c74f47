"""Layer 6, the built-in demo: a tiny GPT-2 pre-trained on fortunes, its prompts, and the
hackable proxy reward and unhackable gold reward the RL demo is judged by.

Needs the ``demo`` extra: ``pip install 'klbelt[demo]'``. Heavy imports happen inside functions.
"""

from .corpus import demo_prompts, load_fortunes
from .model import DEMO_MODEL_DIR, load_demo_model
from .rewards import (
    distinct_n,
    exclaim_rate,
    failure_metrics,
    gold_reward,
    proxy_reward,
    sequence_nll,
)

__all__ = [
    "DEMO_MODEL_DIR",
    "load_demo_model",
    "load_fortunes",
    "demo_prompts",
    "proxy_reward",
    "gold_reward",
    "exclaim_rate",
    "distinct_n",
    "sequence_nll",
    "failure_metrics",
]
