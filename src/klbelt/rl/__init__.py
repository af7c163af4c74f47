"""Layer 5: the RLHF loop on any Hugging Face causal LM (config, rollouts, advantages, PPO losses, trainer).

``train``, ``TrainConfig``, ``sample`` and the rest load on first use, so
``import klbelt.rl`` stays cheap.
"""

from .advantages import gae, group_advantages, whiten
from .losses import ppo_policy_loss, ppo_value_loss
from .reward_model import RewardModel

_LAZY = {
    "TrainConfig": "config",
    "train": "trainer",
    "TrainingError": "trainer",
    "make_controller": "trainer",
    "sample": "rollout",
    "Rollout": "rollout",
    "response_logprobs": "rollout",
    "ValueModel": "critic",
}

__all__ = ["train", "TrainConfig", "TrainingError", "make_controller", "sample", "Rollout", "response_logprobs",
           "ValueModel", "gae", "group_advantages", "whiten", "ppo_policy_loss", "ppo_value_loss", "RewardModel"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
