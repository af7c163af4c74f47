"""The steps of one RLHF update, each a named piece that ``train()`` calls in order.

1. :func:`sample_batch`: the update's prompts and the sampler's responses.
2. :func:`score_batch`: proxy reward, reference log-probs, the trained policy's
   log-probs of the sampled tokens (and importance weights when another
   sampler drew them), values.
3. :func:`shape_rewards_with_kl`: ``r - beta * KL`` per token (or ``r`` alone when the
   KL sits in the loss), then :class:`Advantages` (GAE or the group baseline).
4. :func:`ppo_epochs`: clipped policy (and value) updates over minibatches.
5. :func:`observe_kl`: the KL the controller is fed, in its unit, global over ranks.
6. :func:`step_metrics`: one record per update, through the KL monitor.

The choices a run makes once (where the KL goes, which advantage estimator)
are the small objects :class:`KLInReward` / :class:`KLInLoss` and
:class:`Advantages`, built before the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..kl import aggregate, kl_per_token
from ..shaping import shape_rewards
from .advantages import gae, whiten
from .config import TrainConfig
from .distributed import World
from .lora import autocast
from .losses import ppo_policy_loss, ppo_value_loss
from .rollout import Rollout, response_logprobs
from .text_metrics import distinct_n, exclaim_rate

RewardFn = Callable[[list[str]], torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


def prompt_indices(step: int, n_prompts: int, per_step: int, seed: int) -> list[int]:
    """The prompts of update ``step``: a fresh seeded permutation each pass over the prompts.

    A pure function of the step, so a resumed run sees exactly the same prompts.
    """
    out = []
    start = step * per_step
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[pos]))
    return out


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


def check_finite(loss: torch.Tensor, which: str, step: int, ckpt_path: Path) -> None:
    """Stop on a NaN/inf loss before it reaches the weights; the last checkpoint stays as it was."""
    if not math.isfinite(float(loss.detach())):
        raise TrainingError(
            f"non-finite {which} loss ({float(loss.detach())}) at step {step}; stopping. "
            f"The last good checkpoint is kept in {ckpt_path}"
        )


def weigh(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``x * weights``, or ``x`` itself when the rollouts came from the trained policy (no weights)."""
    return x if weights is None else x * weights


def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``x`` ``[B, R, ...]`` to ``length`` (ranks' responses may end at different lengths)."""
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


# ---------------------------------------------------------------- 1. sample


@dataclass
class Batch:
    """One update's rollouts: the global batch's prompts, this rank's rows of it and their responses."""

    prompts: list[str]  # the global batch's prompts, each repeated group_size times
    rows: slice  # this rank's rows of the global batch
    roll: Rollout  # this rank's prompts and sampled responses
    texts: list[str]  # this rank's decoded responses
    all_texts: list[str] | None = None  # every rank's responses (gathered for the metrics)

    @property
    def mask(self) -> torch.Tensor:
        return self.roll.response_mask


def sample_batch(step: int, prompts: list[str], tokenizer, cfg: TrainConfig, draw, policy, sample_gen: torch.Generator,
                 rows: slice) -> Batch:
    """Draw the update's responses with the sampler ``draw``.

    Every rank tokenizes the global batch and draws the global batch's uniforms
    (same padding, same random stream), then samples its own rows: N processes
    sample exactly the tokens one process would.
    """
    device = torch.device(cfg.device)
    idx = prompt_indices(step, len(prompts), cfg.batch_size // cfg.group_size, cfg.seed)
    batch_prompts = [prompts[i] for i in idx for _ in range(cfg.group_size)]
    enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
    uniforms = torch.rand(cfg.batch_size, cfg.max_new_tokens, generator=sample_gen).to(device)  # CPU stream, any device
    eos = tokenizer.eos_token_id
    roll = draw(
        policy,
        enc["input_ids"][rows].to(device),
        enc["attention_mask"][rows].to(device),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=eos,
        stop_on_eos=cfg.stop_on_eos,
        blocked_token_ids=(eos,) if cfg.block_eos and eos is not None else (),
        pad_token_id=tokenizer.pad_token_id,
        uniforms=uniforms[rows],
    )
    mask = roll.response_mask
    texts = tokenizer.batch_decode(roll.responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                   skip_special_tokens=True)
    return Batch(batch_prompts, rows, roll, texts)


# ---------------------------------------------------------------- 2. score


@dataclass
class Scores:
    """What the update knows about each sampled response before it trains."""

    rewards: torch.Tensor  # [B] proxy reward
    ref_logprobs: torch.Tensor  # [B, R] reference log-probs of the sampled tokens
    old_logprobs: torch.Tensor  # [B, R] the trained policy's log-probs of them (before this update)
    is_weights: torch.Tensor | None  # [B, R] pi/mu (corrected) when a different sampler mu drew the tokens
    mismatch: dict  # mismatch_kl, is_weight_mean, ... (empty when the policy sampled)
    old_values: torch.Tensor | None  # [B, R] the critic's values, if there is one
    ref_nll: torch.Tensor  # [B] reference NLL per token of each response
    first_pass: tuple | None = None  # (log-probs with their graph, entropy) [B, R]: PPO's one pass, already run
    exact_kl: torch.Tensor | None = None  # [B, R] exact full-vocabulary KL(pi || ref) per position (exact_kl_wanted)


def single_pass(cfg: TrainConfig, correction) -> bool:
    """Whether pi's log-probs of the sampled tokens come from PPO's own forward.

    With one epoch of one minibatch, PPO's only forward runs on the weights that
    sampled, so its log-probs *are* pi's "old" log-probs: run it once, before the
    rewards are shaped, keep its graph for the loss, and the recompute that another
    sampler needs costs nothing.
    """
    return correction.active and cfg.ppo_epochs == 1 and cfg.minibatches == 1


def exact_kl_wanted(cfg: TrainConfig) -> bool:
    """Whether the observed KL is the exact per-position one: asked for (``kl_estimator: exact``), or needed.

    A top-k/top-p sampler never draws the tokens it filtered out, which pi and the
    reference still give mass to: no sampled estimate over mu's tokens (k1, nor pi/mu
    times k1) is unbiased for KL(pi || ref) then, the exact sum over the vocabulary is.
    """
    return cfg.kl_estimator == "exact" or bool(cfg.top_k) or cfg.top_p < 1.0


def score_batch(batch: Batch, reward_fn: RewardFn, reference, correction, policy, critic, cfg: TrainConfig,
                use_bf16: bool, train_policy=None) -> Scores:
    """Proxy reward, reference log-probs (same temperature), the policy's log-probs of mu's tokens, values.

    The reference is scored with the numerics of the policy log-probs it is compared
    with: the trained passes' (bf16 autocast when ``use_bf16``) when pi's log-probs are
    recomputed, the sampler's own (no autocast) when the policy sampled. A policy equal
    to its reference then reads a KL of exactly 0.
    """
    roll, mask = batch.roll, batch.mask
    device = torch.device(cfg.device)
    rewards = call_reward(reward_fn, batch.texts, roll).to(device)
    with torch.no_grad(), autocast(device, use_bf16 and correction.active):
        ref_logprobs = reference.logprobs(roll, cfg.temperature).float()
        exact_kl = reference.exact_kl(policy, roll, cfg.temperature) if exact_kl_wanted(cfg) else None
    first_pass = None  # after the reference: its pass's memory is free again before this graph is held
    if single_pass(cfg, correction):
        with autocast(device, use_bf16):
            first_pass = response_logprobs(train_policy or policy, roll, cfg.temperature, with_entropy=True)
    with torch.no_grad():
        # pi's log-probs of mu's tokens (the sampler's own when mu is pi), weights pi/mu or None
        old_logprobs, is_weights, mismatch = correction(policy, roll, cfg.temperature, use_bf16,
                                                        trainer_logprobs=first_pass[0] if first_pass else None)
        old_values = critic(roll) if critic else None
    n_tokens = mask.sum(-1).clamp_min(1)
    ref_nll = -(ref_logprobs * mask).sum(-1) / n_tokens  # per sample, nats/token
    return Scores(rewards, ref_logprobs, old_logprobs, is_weights, mismatch, old_values, ref_nll, first_pass, exact_kl)


# ---------------------------------------------------------------- 3. shape and advantages


class KLInReward:
    """PPO's placement (the article's): ``-beta * k1`` on every token's reward; nothing in the loss."""

    def reward_coef(self, kl_coef: float) -> float:
        return kl_coef

    def loss_term(self, logprobs, ref_logprobs, mask, weights, kl_coef, group, old_logprobs=None):
        return None


@dataclass
class KLInLoss:
    r"""GRPO's placement: ``beta * mean(k2 or k3)`` over valid tokens added to the loss; the reward is ``r`` alone.

    ``ratio_correction`` (TRL's ``use_bias_correction_kl``): after the first minibatch the
    tokens come from pi_old, not pi_theta, so each token's KL is weighed by
    :math:`
ho = \pi_	heta/\pi_{old}`. k3: the differentiable :math:`
ho` (DeepSeek-V3.2):
    :math:`
abla E_{\pi_{old}}[
ho\,k3] = 
abla \sum_x \pi_	heta(x) k3(x) = 
abla KL(\pi_	heta\|ref)`
    in every epoch (also the first, where plain k3 gives that of KL(ref || pi)). k2: the
    value of :math:`
ho` (no gradient through it):
    :math:`E_{\pi_{old}}[
ho\,
abla k2] = \sum_x \pi_	heta(x) \lograc{\pi_	heta}{ref}
abla\log\pi_	heta = 
abla KL(\pi_	heta\|ref)`
    (a differentiable :math:`
ho` would add the gradient of :math:`E_{\pi_	heta}[k2]`, not a KL).
    """

    estimator: str
    log_ratio_clamp: float | None
    clamp_gradient: str
    ratio_correction: bool = False

    def reward_coef(self, kl_coef: float) -> float:
        return 0.0

    def loss_term(self, logprobs, ref_logprobs, mask, weights, kl_coef, group, old_logprobs=None):
        kl = kl_per_token(logprobs, ref_logprobs, self.estimator, log_ratio_clamp=self.log_ratio_clamp,
                          clamp_gradient=self.clamp_gradient, weights=weights)
        if self.ratio_correction and old_logprobs is not None:
            ratio = torch.exp((logprobs - old_logprobs.detach()) * mask)  # 1 on masked positions
            kl = kl * (ratio if self.estimator == "k3" else ratio.detach())
        return kl_coef * aggregate(kl, mask, "token-mean", group=group)


def kl_placement(cfg: TrainConfig) -> KLInReward | KLInLoss:
    """Where the run puts the KL penalty (``cfg.kl_in``)."""
    if cfg.kl_in == "reward":
        return KLInReward()
    return KLInLoss(cfg.kl_estimator, cfg.log_ratio_clamp, cfg.clamp_gradient, cfg.kl_ratio_correction)


def shape_rewards_with_kl(scores: Scores, mask: torch.Tensor, reward_kl_coef: float, cfg: TrainConfig):
    """The article's reward, ``r - beta * k1`` per token (the score on the last token), and the observed KL.

    Returns ``(shaped, kl)``: ``shaped.rewards`` ``[B, R]`` for the advantages, and
    ``kl`` ``[B, R]``, the per-token KL the controller and the metrics see: never
    clamped (it is the run's true drift), and importance-weighted when another
    sampler drew the tokens (``w * k1`` estimates KL(pi || ref) under mu), or the exact
    full-vocabulary KL(pi || ref) at each visited position when the scores hold it
    (``kl_estimator: exact``, or a top-k/top-p sampler; see :func:`exact_kl_wanted`).
    """
    shaped = shape_rewards(scores.rewards, scores.old_logprobs, scores.ref_logprobs, mask, reward_kl_coef, "k1",
                           log_ratio_clamp=cfg.log_ratio_clamp, clamp_gradient=cfg.clamp_gradient)
    if scores.exact_kl is not None:
        return shaped, scores.exact_kl * mask
    kl = (scores.old_logprobs - scores.ref_logprobs) * mask if cfg.log_ratio_clamp else shaped.kl
    return shaped, weigh(kl, scores.is_weights)


@dataclass
class Advantages:
    """The advantage estimator, chosen once: GAE with the critic, or the group baseline."""

    kind: str  # "gae" or "group"
    gamma: float
    lam: float
    group_size: int
    whiten: bool
    group: object = None  # the process group (whitening is global over ranks)

    @classmethod
    def from_config(cls, cfg: TrainConfig, group=None) -> "Advantages":
        return cls(cfg.advantage, cfg.gamma, cfg.lam, cfg.group_size, cfg.whiten_advantages, group)

    def __call__(self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
                 is_weights: torch.Tensor | None = None):
        """``(advantages, returns)``; returns is None without a critic. Weighted by pi/mu when given
        (w >= 0, so w * PPO's clipped term = PPO's term with advantage w * A)."""
        if self.kind == "gae":
            advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        else:
            # critic-free: reward-to-go minus the mean total return of the sample's group
            to_go = rewards.flip(-1).cumsum(-1).flip(-1)
            totals = rewards.sum(-1).reshape(-1, self.group_size)
            baseline = totals.mean(-1, keepdim=True).expand_as(totals).reshape(-1, 1)
            advantages, returns = (to_go - baseline) * mask, None
        if self.whiten:
            advantages = whiten(advantages, mask, group=self.group)
        return weigh(advantages, is_weights), returns


# ---------------------------------------------------------------- 4. PPO


@dataclass
class PPOStats:
    losses: list  # per minibatch: [pg_loss, vf_loss, clip_frac, approx_kl]
    entropy_sums: list  # per minibatch: (sum of entropy over valid tokens, valid tokens)


def ppo_epochs(state, train_policy, train_critic, batch: Batch, scores: Scores, advantages, returns, placement,
               kl_coef: float, cfg: TrainConfig, world: World, use_bf16: bool, step: int, ckpt_path: Path) -> PPOStats:
    """``ppo_epochs`` passes of ``minibatches`` clipped policy (and value) updates.

    Losses are global means (sum over ranks / global count); DDP averages
    gradients over the ranks, so each rank's loss is scaled by the number of
    ranks to give the gradient of the global mean.
    """
    device = torch.device(cfg.device)
    stats = PPOStats([], [])
    local_batch = batch.rows.stop - batch.rows.start
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(local_batch, generator=state.shuffle_gen).to(device)
        for mb in order.split(local_batch // cfg.minibatches):
            mb_roll, mb_mask = batch.roll.select(mb), batch.mask[mb]
            if scores.first_pass is not None:  # the one pass ran in score_batch (single_pass): its graph is here
                logprobs, entropy = (x[mb] for x in scores.first_pass)
                scores.first_pass = None
            else:
                with autocast(device, use_bf16):
                    logprobs, entropy = response_logprobs(train_policy, mb_roll, cfg.temperature, with_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, scores.old_logprobs[mb], advantages[mb], mb_mask,
                                                cfg.clip_range, group=world.group)
            loss = pg_loss
            kl_loss = placement.loss_term(logprobs, scores.ref_logprobs[mb], mb_mask,
                                          None if scores.is_weights is None else scores.is_weights[mb], kl_coef,
                                          world.group, old_logprobs=scores.old_logprobs[mb])
            if kl_loss is not None:
                loss = loss + kl_loss
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * aggregate(entropy, mb_mask, "token-mean", group=world.group)
            check_finite(loss, "policy", step, ckpt_path)  # a global value: every rank stops together
            optimizer_step(loss * world.size, state.policy_master, state.policy_opt, cfg.max_grad_norm)
            vf_loss = torch.zeros((), device=device)  # no critic: a zero on the run's device, stacked with the losses
            if state.critic:
                with autocast(device, use_bf16):
                    values = train_critic(mb_roll)
                vf_loss = ppo_value_loss(values.float(), scores.old_values[mb], returns[mb], mb_mask, cfg.value_clip,
                                         group=world.group)
                check_finite(vf_loss, "value", step, ckpt_path)
                optimizer_step(cfg.vf_coef * world.size * vf_loss, state.critic_master, state.critic_opt,
                               cfg.max_grad_norm)
            stats.losses.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["clip_frac"],
                                             pg_stats["approx_kl"]]))
            stats.entropy_sums.append(((entropy * mb_mask).sum(), mb_mask.sum()))  # reduced with the step's sums
    return stats


def optimizer_step(loss: torch.Tensor, master, optimizer, max_grad_norm: float) -> None:
    """Backward, gradients to the fp32 masters, clip, step, and the new weights back to the model."""
    loss.backward()
    master.grads_to_master()
    torch.nn.utils.clip_grad_norm_(master.params(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next pass
    master.to_model()


# ---------------------------------------------------------------- 5. the KL belt


@dataclass
class Observed:
    """The step's global sums, reduced in one all-reduce: the KL for the controller, entropy, k3."""

    kl: float  # nats/token, or nats/sequence for a "seq-sum" controller
    entropy: float  # nats/token
    k3: float  # nats/token


def observe_kl(kl: torch.Tensor, mask: torch.Tensor, scores: Scores, ppo: PPOStats, unit: str, world: World,
               estimator: str = "k1") -> Observed:
    """The KL the controller is fed, in its unit: global sum / global count over all ranks.

    ``kl`` is the step's per-token k1 (importance-weighted when another sampler
    drew the tokens); ``estimator="k3"`` feeds the same-weighted k3 instead,
    an unbiased estimate of the same KL(pi || ref) with a smaller variance.
    When ``kl`` is the exact per-position KL (``scores.exact_kl``: ``kl_estimator:
    exact`` or a top-k/top-p sampler) it is fed whatever ``estimator`` says: no
    sampled estimate over a filtered sampler's tokens is unbiased.
    Every rank gets the same number, and so the same beta. The step's other
    global sums (entropy, k3) travel in the same all-reduce.
    """
    n_seqs = (mask.sum(-1) > 0).sum()
    entropy_sum, entropy_count = (sum(x) for x in zip(*ppo.entropy_sums))
    k3_sum = (kl_per_token(scores.old_logprobs, scores.ref_logprobs, "k3", weights=scores.is_weights) * mask).sum()
    fed = k3_sum if estimator == "k3" and scores.exact_kl is None else (kl * mask).sum()
    sums = [fed, mask.sum() if unit == "token-mean" else n_seqs, entropy_sum, entropy_count, k3_sum, mask.sum()]
    kl_sum, kl_count, entropy_sum, entropy_count, k3_sum, n_tokens = world.all_sum(torch.stack(sums).double()).tolist()
    return Observed(kl=kl_sum / kl_count if kl_count else 0.0,  # nats/token, or nats/sequence for "seq-sum"
                    entropy=entropy_sum / max(entropy_count, 1.0),
                    k3=k3_sum / max(n_tokens, 1.0))


# ---------------------------------------------------------------- 6. metrics


def step_metrics(monitor, step: int, batch: Batch, scores: Scores, kl: torch.Tensor, ppo: PPOStats,
                 observed: Observed, kl_coef: float, next_kl_coef: float, gold_fn, cfg: TrainConfig, world: World,
                 started: float) -> tuple[dict, torch.Tensor]:
    """One record per update, via the KL monitor and its health rules, from the global batch gathered on every rank.

    Returns ``(record, per_sequence)``; ``per_sequence`` ``[B_global, 3 or 4]``
    holds each response's proxy reward, reference NLL, length (and gold).
    Sets ``batch.all_texts``.
    """
    device = torch.device(cfg.device)
    mask = batch.mask
    pg, vf, clip_frac, approx_kl = torch.stack(ppo.losses).mean(0).tolist()
    gold = gold_fn(batch.texts, scores.ref_nll.cpu()) if gold_fn else None
    per_seq = [scores.rewards, scores.ref_nll, mask.sum(-1)] + (
        [torch.as_tensor(gold, dtype=torch.float32, device=device)] if gold_fn else [])
    per_seq = torch.stack([v.float() for v in per_seq], -1)
    per_token = pad_to(torch.stack([kl, mask], -1), cfg.max_new_tokens).flatten(1)
    rows_global = world.gather_rows(torch.cat([per_seq, per_token], -1))  # one gather for both
    per_seq, per_token = rows_global[:, : per_seq.shape[1]], rows_global[:, per_seq.shape[1] :].unflatten(1, (-1, 2))
    batch.all_texts = texts = world.gather_list(batch.texts)
    record = monitor.log_step(
        step,
        kl=per_token[..., 0].contiguous(),
        mask=per_token[..., 1].contiguous(),
        kl_coef=kl_coef,
        reward=per_seq[:, 0],
        gold_reward=per_seq[:, 3] if gold_fn else None,
        entropy=observed.entropy,
        kl_k3=float(observed.k3),
        next_kl_coef=float(next_kl_coef),
        exclaim_rate=exclaim_rate(texts),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        ref_nll=float(per_seq[:, 1].mean()),
        response_len=float(per_seq[:, 2].mean()),
        pg_loss=pg,
        vf_loss=vf,
        clip_frac=clip_frac,
        approx_kl=approx_kl,
        seconds=time.perf_counter() - started,
        **scores.mismatch,
    )
    return record, per_seq
