"""Layer 5: the RL pieces (advantages, PPO losses). The trainer loop is still to come."""

from .advantages import gae, group_advantages, whiten
from .losses import ppo_policy_loss, ppo_value_loss
from .reward_model import RewardModel

__all__ = ["gae", "group_advantages", "whiten", "ppo_policy_loss", "ppo_value_loss", "RewardModel"]
