"""Mixed precision for the trainer: fp32 master weights behind a bf16 or fp16 model.

A model held in bf16 or fp16 computes in that dtype (its logits are upcast to
fp32 before any log-softmax, see ``klbelt.kl``), but its weights must not be
*updated* in it: AdamW's ``eps = 1e-8`` is 0 in fp16 (a zero gradient then
gives 0/0 = NaN), and bf16's 8-bit mantissa drops any update smaller than
about 0.4% of a weight, so a low-precision model trained in place stalls or
breaks. The optimizer therefore steps fp32 copies of the trainable weights and
each step's result is rounded back into the model.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """fp32 copies of ``model``'s trainable parameters when any of them is not fp32; a no-op otherwise.

    Use: build the optimizer over ``params()``; after ``backward()`` call
    ``grads_to_master()``; clip and step on ``params()``; then ``to_model()``.
    """

    def __init__(self, model: torch.nn.Module):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.active = any(p.dtype != torch.float32 for p in self.model_params)
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.model_params] if self.active else []

    def params(self) -> list[torch.Tensor]:
        """What the optimizer steps: the fp32 masters, or the model's own fp32 parameters."""
        return self.master if self.active else self.model_params

    def grads_to_master(self) -> None:
        """Move the model's gradients (already all-reduced by DDP) onto the masters, in fp32."""
        if not self.active:
            return
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the updated masters into the model's own dtype."""
        for p, m in zip(self.model_params, self.master):
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor] | None:
        return [m.detach().clone() for m in self.master] if self.active else None

    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        if not self.active:
            return
        if state is None or len(state) != len(self.master):
            raise ValueError("resume: the checkpoint has no fp32 master weights for this low-precision model "
                             "(was the run started with the model in another dtype?)")
        with torch.no_grad():
            for m, saved in zip(self.master, state):
                m.copy_(saved)
        self.to_model()
