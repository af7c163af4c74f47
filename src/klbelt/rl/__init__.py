"""Layer 5: the RLHF loop on any Hugging Face causal LM (config, sampling, scoring, advantages, PPO losses, trainer).

``train``, ``TrainConfig``, ``sample`` and the rest load on first use, so
``import klbelt.rl`` stays cheap.
"""

from .advantages import gae, group_advantages, group_baseline, whiten
from .losses import ppo_policy_loss, ppo_value_loss
from .reward_model import RewardModel

_LAZY = {
    "TrainConfig": "config",
    "train": "trainer",
    "TrainingError": "update",
    "make_controller": "run_state",
    "Run": "run",
    "sample": "sampling",
    "make_sampler": "sampling",
    "SamplingParams": "sampling",
    "Rollout": "sampling",
    "response_logprobs": "scoring",
    "Reference": "scoring",
    "ValueModel": "critic",
}

__all__ = ["train", "TrainConfig", "TrainingError", "make_controller", "Run", "sample", "make_sampler", "SamplingParams",
           "Rollout", "response_logprobs", "Reference", "ValueModel", "gae", "group_advantages", "group_baseline",
           "whiten", "ppo_policy_loss", "ppo_value_loss", "RewardModel"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
