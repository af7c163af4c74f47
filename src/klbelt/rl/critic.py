"""A value model: a causal LM's transformer trunk with a scalar head."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .hf import forward_tokens, hf_model
from .sampling.rollout import Rollout


class ValueModel(nn.Module):
    """V(s_t) for every response position, from the trunk's last hidden state.

    ``ValueModel.from_policy(policy)`` copies the policy's trunk (its
    ``base_model``) so the critic starts from the same features and trains
    separately (no shared parameters, no interference with the policy loss).
    The head starts at zero: initial values are 0.
    """

    def __init__(self, trunk: nn.Module, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy) -> "ValueModel":
        trunk = copy.deepcopy(hf_model(policy).base_model)  # a peft model's transformer
        trunk.requires_grad_(True)
        return cls(trunk, policy.config.hidden_size)

    def forward(self, rollout: Rollout) -> torch.Tensor:
        """Values ``[B, R]`` (fp32) at the positions that predict each response token."""
        R = rollout.response_len
        hidden = forward_tokens(self.trunk, rollout.sequences, rollout.attention_mask).last_hidden_state[:, -(R + 1) : -1]
        # the head is fp32 whatever the trunk's dtype: values are regression targets, kept in fp32
        return self.head(hidden.float()).squeeze(-1) * rollout.response_mask
