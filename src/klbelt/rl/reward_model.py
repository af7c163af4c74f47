"""Rewards: :func:`call_reward` scores a batch with any reward function and checks what it returns;
:class:`RewardModel` is a reward from a Hugging Face sequence-classification model with one label.

r(prompt, response) is the model's scalar output read at the last valid token
of prompt + response, the convention of decoder reward models (GPT-2, Llama,
Qwen, ... ``ForSequenceClassification``: a transformer trunk and a linear
``score`` head).
"""

from __future__ import annotations

from typing import Callable

import torch

from .hf import forward_tokens
from .sampling.rollout import Rollout

RewardFn = Callable[[list[str]], torch.Tensor]


def call_reward(reward_fn: RewardFn, texts: list[str], rollout: Rollout | None = None, name: str = "reward function") -> torch.Tensor:
    """Score a batch and check the result is ``[B]`` finite numbers.

    ``reward_fn`` is a texts -> scores callable, or an object with a
    ``score_rollout(rollout)`` method (e.g. a reward model that reads the
    token ids directly, with no decode/re-encode).
    """
    if rollout is not None and hasattr(reward_fn, "score_rollout"):
        scores = reward_fn.score_rollout(rollout)
    else:
        scores = reward_fn(texts)
    scores = torch.as_tensor(scores).detach().float()
    if scores.shape != (len(texts),):
        raise ValueError(f"{name} must return one score per text, shape [{len(texts)}]; got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} returned NaN or infinite scores for {int((~torch.isfinite(scores)).sum())} of {len(texts)} texts")
    return scores


class RewardModel:
    """Scores rollouts (token ids) or texts with an ``AutoModelForSequenceClassification`` (``num_labels=1``).

    * ``score_rollout(rollout)``: when the reward model shares the policy's
      tokenizer, the rollout's ids are scored as they are: one trunk forward
      over the left-padded prompt + response with the response mask (tokens
      after EOS are masked), the head applied to each row's last valid token
      only. No decode, no re-encode. With another tokenizer, the rollout is
      decoded with ``policy_tokenizer`` and scored as texts.
    * ``__call__(texts)``: tokenizes with the reward model's own tokenizer
      and scores each text at its last non-padding token.

    Both return ``[B]`` fp32 scores on the model's device. The model is put in
    eval mode and never receives gradients.

    Args:
        model: a sequence-classification model with ``config.num_labels == 1``.
        tokenizer: the reward model's tokenizer (needed for texts).
        policy_tokenizer: the policy's tokenizer, if it may differ from
            ``tokenizer``; the two are "shared" when they are the same object
            or have the same vocabulary.
    """

    def __init__(self, model, tokenizer=None, *, policy_tokenizer=None):
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ValueError(f"model must be a sequence-classification model with num_labels=1 (a scalar reward); got num_labels={num_labels!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer
        # a decoder classifier: trunk + linear head on the last token; read the score where we choose
        self._head = getattr(model, "score", None)
        self.shares_tokenizer = policy_tokenizer is None or tokenizer is None or policy_tokenizer is tokenizer or (
            policy_tokenizer.get_vocab() == tokenizer.get_vocab()
        )

    @classmethod
    def from_pretrained(cls, path: str, *, policy_tokenizer=None, device: str | torch.device = "cpu") -> "RewardModel":
        """Load a local model directory (model and tokenizer); one-line error if it cannot be read."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"reward model {path}: cannot be loaded as a sequence-classification model ({first})") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model.to(device), tokenizer, policy_tokenizer=policy_tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` of ``input_ids [B, T]`` read at each row's last position where ``attention_mask`` is 1.

        Valid positions may be preceded (left padding) and followed (right
        padding) by masked ones; positions count from each row's first valid token.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, T]; got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.long()
        T = mask.shape[1]
        # index of the last 1 in each row (0 for an all-zero row)
        last = (T - 1 - mask.flip(-1).argmax(-1)) * (mask.sum(-1) > 0)
        rows = torch.arange(mask.shape[0], device=mask.device)
        if self._head is None:  # no separate head: let the model pool, padding after the last token with its pad id
            pad = self.model.config.pad_token_id
            ids = input_ids if pad is None else input_ids.masked_fill(mask == 0, pad)
            return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        hidden = forward_tokens(self.model.base_model, input_ids, mask).last_hidden_state
        return self._head(hidden[rows, last]).squeeze(-1).float()

    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Scores ``[B]`` of prompt + response, read at the last valid token (the EOS where one was sampled)."""
        if not self.shares_tokenizer:
            return self(self._decode(rollout))
        P = rollout.prompt_len
        mask = torch.cat([rollout.attention_mask[:, :P].long(), rollout.response_mask.long()], dim=1)
        return self.score_ids(rollout.sequences.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Scores ``[B]`` of ``texts`` tokenized with the reward model's tokenizer."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if self.tokenizer is None:
            raise ValueError("scoring texts needs the reward model's tokenizer; pass tokenizer= to RewardModel")
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return self.score_ids(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def _decode(self, rollout: Rollout) -> list[str]:
        tok = self.policy_tokenizer
        P = rollout.prompt_len
        keep = torch.cat([rollout.attention_mask[:, :P].bool(), rollout.response_mask.bool()], dim=1)
        return [tok.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(rollout.sequences.cpu(), keep.cpu())]
