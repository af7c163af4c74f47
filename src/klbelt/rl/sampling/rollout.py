"""What every sampler is given and what it returns: :class:`SamplingParams` and :class:`Rollout`.

Shapes: B sequences, P prompt positions (prompts left-padded to a common
length), R response positions. Response tensors are ``[B, R]`` with a mask
that is 1 on generated tokens up to and including the first EOS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a rollout is drawn, the same for every sampler (keyword arguments of :func:`~klbelt.rl.sampling.sample`).

    ``blocked_token_ids`` are removed from the distribution (which renormalises);
    ``top_k`` / ``top_p`` (0 / 1.0: off) make the sampler the filtered distribution.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    stop_on_eos: bool = True
    blocked_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "SamplingParams":
        """A run's sampling: ``cfg``'s length, temperature and filters; the tokenizer's EOS (never sampled
        under ``cfg.block_eos``) and pad ids."""
        eos = tokenizer.eos_token_id
        return cls(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   eos_token_id=eos, stop_on_eos=cfg.stop_on_eos,
                   blocked_token_ids=(eos,) if cfg.block_eos and eos is not None else (),
                   pad_token_id=tokenizer.pad_token_id)

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p is on (the sampler mu is then never the model itself)."""
        return bool(self.top_k) or self.top_p < 1.0

    def as_kwargs(self) -> dict:
        """The keyword arguments of a sampling function's call."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def blocked_tensor(token_ids, device) -> torch.Tensor | None:
    """``token_ids`` (sorted, each once) as a long tensor on ``device``; ``None`` when there are none."""
    if not token_ids:
        return None
    return torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=device)


@dataclass
class Rollout:
    """One batch of sampled continuations.

    Attributes:
        sequences: ``[B, P + R]`` prompt then response token ids.
        attention_mask: ``[B, P + R]`` 0 on left padding of the prompt, 1 elsewhere.
        prompt_len: P.
        response_mask: ``[B, R]`` float, 1 on generated tokens up to and including EOS.
        logprobs: ``[B, R]`` fp32 log-probs of the sampled tokens under the sampler's
            distribution mu: the model's at the sampling temperature, blocked tokens
            removed, then top-k/top-p filtered and renormalised (the distribution the
            tokens were drawn from), computed from the sampling forward passes.
        filtered_mass: ``[B, R]`` the model's probability mass that top-k/top-p dropped
            at each step (0 on masked positions); ``None`` when no filter was on.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    blocked_token_ids: tuple[int, ...] = ()
    filtered_mass: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]

    @property
    def response_len(self) -> int:
        """R, the response positions (the longest response; shorter ones are masked)."""
        return self.sequences.shape[1] - self.prompt_len

    def blocked(self, device=None) -> torch.Tensor | None:
        """The blocked token ids as a tensor on ``device`` (the sequences' by default), or ``None``."""
        return blocked_tensor(self.blocked_token_ids, device or self.sequences.device)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(
            self.sequences[index],
            self.attention_mask[index],
            self.prompt_len,
            self.response_mask[index],
            self.logprobs[index],
            self.blocked_token_ids,
            None if self.filtered_mass is None else self.filtered_mass[index],
        )
