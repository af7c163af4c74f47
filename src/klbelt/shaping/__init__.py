"""Layer 2: reward shaping, r - beta * KL."""

from .article import compute_kl_penalty, compute_rewards_with_kl
from .shape import ShapedRewards, shape_rewards

__all__ = ["compute_kl_penalty", "compute_rewards_with_kl", "shape_rewards", "ShapedRewards"]
