"""The steps of one RLHF update, each a named piece that ``train()`` calls in order.

1. :func:`sample_batch`: the update's prompts and the sampler's responses.
2. :func:`score_batch`: proxy reward, reference log-probs, the trained policy's
   log-probs of the sampled tokens (and importance weights when another
   sampler drew them), values.
3. :func:`shape_rewards_with_kl`: ``r - beta * KL`` per token (or ``r`` alone when the
   KL sits in the loss), then the run's :class:`~klbelt.rl.advantages.Advantages`.
4. :func:`ppo_epochs`: clipped policy (and value) updates, one :func:`ppo_minibatch` at a time.
5. :func:`observe_kl`: the KL the controller is fed, in its unit, global over ranks.
6. :func:`step_metrics`: one record per update, through the KL monitor.

Every step takes the run (:class:`~klbelt.rl.run.Run`: config, world, models,
sampler, correction, KL placement, ...) and what changes from one update to the
next, and returns what it made.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..kl import aggregate, kl_per_token
from ..shaping import shape_rewards
from .advantages import Advantages, weigh  # noqa: F401  (Advantages: its old path)
from .config import TrainConfig
from .losses import KLInLoss, KLInReward, kl_placement, ppo_policy_loss, ppo_value_loss  # noqa: F401  (old paths)
from .precision import autocast, optimizer_step
from .reward_model import RewardFn, call_reward  # noqa: F401  (RewardFn: its old path)
from .run_files import CHECKPOINT_FILE
from .sampling.rollout import Rollout
from .scoring import response_logprobs
from .text_metrics import distinct_n, exclaim_rate


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


def check_finite(loss: torch.Tensor, which: str, step: int, ckpt_path: Path) -> None:
    """Stop on a NaN/inf loss before it reaches the weights; the last checkpoint stays as it was."""
    if not math.isfinite(float(loss.detach())):
        raise TrainingError(
            f"non-finite {which} loss ({float(loss.detach())}) at step {step}; stopping. "
            f"The last good checkpoint is kept in {ckpt_path}"
        )


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
    step: int = 0  # the update it belongs to
    started: float = 0.0  # time.perf_counter() when its sampling began (the update's ``seconds``)

    @property
    def mask(self) -> torch.Tensor:
        return self.roll.response_mask


def sample_batch(run, step: int, sample_gen: torch.Generator) -> Batch:
    """Draw update ``step``'s responses with the run's sampler, uniforms from ``sample_gen``.

    Every rank tokenizes the global batch and draws the global batch's uniforms
    (same padding, same random stream), then samples its own rows: N processes
    sample exactly the tokens one process would.
    """
    started = time.perf_counter()
    cfg, device, rows, tokenizer = run.cfg, run.device, run.rows, run.tokenizer
    idx = prompt_indices(step, len(run.prompts), cfg.batch_size // cfg.group_size, cfg.seed)
    batch_prompts = [run.prompts[i] for i in idx for _ in range(cfg.group_size)]
    enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
    uniforms = torch.rand(cfg.batch_size, cfg.max_new_tokens, generator=sample_gen).to(device)  # CPU stream, any device
    roll = run.sampler(run.policy, enc["input_ids"][rows].to(device), enc["attention_mask"][rows].to(device),
                       uniforms=uniforms[rows], **run.sampling.as_kwargs())
    mask = roll.response_mask
    texts = tokenizer.batch_decode(roll.responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                   skip_special_tokens=True)
    return Batch(batch_prompts, rows, roll, texts, step, started)


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

    def select(self, index: torch.Tensor) -> "Scores":
        """The rows ``index`` of every per-response tensor (the mismatch metrics stay the batch's)."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Scores(self.rewards[index], self.ref_logprobs[index], self.old_logprobs[index], pick(self.is_weights),
                      self.mismatch, pick(self.old_values), self.ref_nll[index],
                      None if self.first_pass is None else tuple(x[index] for x in self.first_pass),
                      pick(self.exact_kl))


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


def score_batch(run, batch: Batch) -> Scores:
    """Proxy reward, reference log-probs (same temperature), the policy's log-probs of mu's tokens, values.

    The reference is scored with the numerics of the policy log-probs it is compared
    with: the trained passes' (bf16 autocast when ``run.bf16``) when pi's log-probs are
    recomputed, the sampler's own (no autocast) when the policy sampled. A policy equal
    to its reference then reads a KL of exactly 0.
    """
    cfg, roll, mask, device = run.cfg, batch.roll, batch.mask, run.device
    rewards = call_reward(run.reward_fn, batch.texts, roll).to(device)
    with torch.no_grad(), autocast(device, run.bf16 and run.correction.active):
        ref_logprobs = run.reference.logprobs(roll, cfg.temperature).float()
        exact_kl = run.reference.exact_kl(run.policy, roll, cfg.temperature) if exact_kl_wanted(cfg) else None
    first_pass = None  # after the reference: its pass's memory is free again before this graph is held
    if single_pass(cfg, run.correction):
        with autocast(device, run.bf16):
            first_pass = response_logprobs(run.train_policy or run.policy, roll, cfg.temperature, with_entropy=True,
                                           fused=run.fused_head)
    with torch.no_grad():
        # pi's log-probs of mu's tokens (the sampler's own when mu is pi), weights pi/mu or None
        old_logprobs, is_weights, mismatch = run.correction(run.policy, roll, cfg.temperature, run.bf16,
                                                            trainer_logprobs=first_pass[0] if first_pass else None)
        old_values = run.critic(roll) if run.critic else None
    n_tokens = mask.sum(-1).clamp_min(1)
    ref_nll = -(ref_logprobs * mask).sum(-1) / n_tokens  # per sample, nats/token
    return Scores(rewards=rewards, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, is_weights=is_weights,
                  mismatch=mismatch, old_values=old_values, ref_nll=ref_nll, first_pass=first_pass, exact_kl=exact_kl)


# ---------------------------------------------------------------- 3. shape (the advantages: advantages.Advantages)


def shape_rewards_with_kl(run, scores: Scores, mask: torch.Tensor, reward_kl_coef: float):
    """The article's reward, ``r - beta * k1`` per token (the score on the last token), and the observed KL.

    Returns ``(shaped, kl)``: ``shaped.rewards`` ``[B, R]`` for the advantages, and
    ``kl`` ``[B, R]``, the per-token KL the controller and the metrics see: never
    clamped (it is the run's true drift), and importance-weighted when another
    sampler drew the tokens (``w * k1`` estimates KL(pi || ref) under mu), or the exact
    full-vocabulary KL(pi || ref) at each visited position when the scores hold it
    (``kl_estimator: exact``, or a top-k/top-p sampler; see :func:`exact_kl_wanted`).
    """
    cfg = run.cfg
    shaped = shape_rewards(scores.rewards, scores.old_logprobs, scores.ref_logprobs, mask, reward_kl_coef, "k1",
                           log_ratio_clamp=cfg.log_ratio_clamp, clamp_gradient=cfg.clamp_gradient)
    if scores.exact_kl is not None:
        return shaped, scores.exact_kl * mask
    kl = (scores.old_logprobs - scores.ref_logprobs) * mask if cfg.log_ratio_clamp else shaped.kl
    return shaped, weigh(kl, scores.is_weights)


# ---------------------------------------------------------------- 4. PPO


@dataclass
class PPOStats:
    losses: list  # per minibatch: [pg_loss, vf_loss, clip_frac, approx_kl]
    entropy_sums: list  # per minibatch: (sum of entropy over valid tokens, valid tokens)


def ppo_epochs(run, state, batch: Batch, scores: Scores, advantages: torch.Tensor, returns: torch.Tensor | None,
               kl_coef: float) -> PPOStats:
    """``ppo_epochs`` passes of ``minibatches`` clipped policy (and value) updates (:func:`ppo_minibatch`).

    Losses are global means (sum over ranks / global count); DDP averages
    gradients over the ranks, so each rank's loss is scaled by the number of
    ranks to give the gradient of the global mean. ``scores.first_pass`` (the one
    pass :func:`score_batch` ran, see :func:`single_pass`) serves the first minibatch.
    """
    cfg = run.cfg
    stats = PPOStats([], [])
    local_batch = batch.rows.stop - batch.rows.start
    first = scores
    later = replace(scores, first_pass=None)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(local_batch, generator=state.shuffle_gen).to(run.device)
        for mb in order.split(local_batch // cfg.minibatches):
            targets = advantages[mb], None if returns is None else returns[mb]
            losses, entropy_sum = ppo_minibatch(run, state, batch.roll.select(mb), first.select(mb), targets, kl_coef,
                                                batch.step)
            first = later
            stats.losses.append(losses)
            stats.entropy_sums.append(entropy_sum)  # reduced with the step's sums
    return stats


def ppo_minibatch(run, state, roll: Rollout, scores: Scores, targets: tuple, kl_coef: float,
                  step: int) -> tuple[torch.Tensor, tuple]:
    """One clipped policy update (``+ beta * KL`` when the KL is in the loss, ``- entropy_coef * H``) and one
    value update on a minibatch: its rows of the rollout and the scores, and ``targets``, its
    ``(advantages, returns)``.

    Returns ``([pg_loss, vf_loss, clip_frac, approx_kl], (entropy sum, valid tokens))``.
    """
    cfg, world, device = run.cfg, run.world, run.device
    mask = roll.response_mask
    advantages, returns = targets
    ckpt_path = Path(cfg.out) / CHECKPOINT_FILE
    if scores.first_pass is not None:  # the one pass ran in score_batch (single_pass): its graph is here
        logprobs, entropy = scores.first_pass
    else:
        with autocast(device, run.bf16):
            logprobs, entropy = response_logprobs(run.train_policy, roll, cfg.temperature, with_entropy=True,
                                                  fused=run.fused_head)
    pg_loss, pg_stats = ppo_policy_loss(logprobs, scores.old_logprobs, advantages, mask, cfg.clip_range,
                                        group=world.group)
    loss = pg_loss
    kl_loss = run.placement.loss_term(logprobs, scores.ref_logprobs, mask, scores.is_weights, kl_coef, world.group,
                                      old_logprobs=scores.old_logprobs)
    if kl_loss is not None:
        loss = loss + kl_loss
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(entropy, mask, "token-mean", group=world.group)
    check_finite(loss, "policy", step, ckpt_path)  # a global value: every rank stops together
    optimizer_step(loss * world.size, state.policy_master, state.policy_opt, cfg.max_grad_norm)
    vf_loss = torch.zeros((), device=device)  # no critic: a zero on the run's device, stacked with the losses
    if state.critic:
        with autocast(device, run.bf16):
            values = run.train_critic(roll)
        vf_loss = ppo_value_loss(values.float(), scores.old_values, returns, mask, cfg.value_clip, group=world.group)
        check_finite(vf_loss, "value", step, ckpt_path)
        optimizer_step(cfg.vf_coef * world.size * vf_loss, state.critic_master, state.critic_opt, cfg.max_grad_norm)
    losses = torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["clip_frac"], pg_stats["approx_kl"]])
    return losses, ((entropy * mask).sum(), mask.sum())


# ---------------------------------------------------------------- 5. the KL belt


@dataclass
class Observed:
    """The step's global sums, reduced in one all-reduce: the KL for the controller, entropy, k3."""

    kl: float  # nats/token, or nats/sequence for a "seq-sum" controller
    entropy: float  # nats/token
    k3: float  # nats/token


def observe_kl(run, batch: Batch, scores: Scores, kl: torch.Tensor, ppo: PPOStats, unit: str) -> Observed:
    """The KL the controller is fed, in its ``unit``: global sum / global count over all ranks.

    ``kl`` is the step's per-token k1 (importance-weighted when another sampler
    drew the tokens); ``controller_estimator: k3`` feeds the same-weighted k3 instead,
    an unbiased estimate of the same KL(pi || ref) with a smaller variance.
    When ``kl`` is the exact per-position KL (``scores.exact_kl``: ``kl_estimator:
    exact`` or a top-k/top-p sampler) it is fed whatever the estimator says: no
    sampled estimate over a filtered sampler's tokens is unbiased.
    Every rank gets the same number, and so the same beta. The step's other
    global sums (entropy, k3) travel in the same all-reduce.
    """
    mask = batch.mask
    n_seqs = (mask.sum(-1) > 0).sum()
    entropy_sum, entropy_count = (sum(x) for x in zip(*ppo.entropy_sums))
    k3_sum = (kl_per_token(scores.old_logprobs, scores.ref_logprobs, "k3", weights=scores.is_weights) * mask).sum()
    fed = k3_sum if run.cfg.controller_estimator == "k3" and scores.exact_kl is None else (kl * mask).sum()
    sums = [fed, mask.sum() if unit == "token-mean" else n_seqs, entropy_sum, entropy_count, k3_sum, mask.sum()]
    kl_sum, kl_count, entropy_sum, entropy_count, k3_sum, n_tokens = run.world.all_sum(torch.stack(sums).double()).tolist()
    return Observed(kl=kl_sum / kl_count if kl_count else 0.0,  # nats/token, or nats/sequence for "seq-sum"
                    entropy=entropy_sum / max(entropy_count, 1.0),
                    k3=k3_sum / max(n_tokens, 1.0))


# ---------------------------------------------------------------- 6. metrics


@dataclass
class StepRecord:
    """What :func:`step_metrics` made of one update, gathered from every rank."""

    record: dict  # the metrics.jsonl line (the monitor's statistics and alerts)
    per_sequence: torch.Tensor  # [B_global, 3 or 4]: proxy reward, reference NLL, length (and gold) per response
    texts: list[str]  # every rank's responses, in the global batch's order


def step_metrics(run, batch: Batch, scores: Scores, kl: torch.Tensor, ppo: PPOStats, observed: Observed,
                 betas: tuple[float, float]) -> StepRecord:
    """One record per update, via the KL monitor and its health rules, from the global batch gathered on every rank.

    ``betas``: the beta this update was shaped with and the one the controller set for the next.
    """
    cfg, world = run.cfg, run.world
    kl_coef, next_kl_coef = betas
    mask = batch.mask
    pg, vf, clip_frac, approx_kl = torch.stack(ppo.losses).mean(0).tolist()
    gold = run.gold_fn(batch.texts, scores.ref_nll.cpu()) if run.gold_fn else None
    per_seq = [scores.rewards, scores.ref_nll, mask.sum(-1)] + (
        [torch.as_tensor(gold, dtype=torch.float32, device=run.device)] if run.gold_fn else [])
    per_seq = torch.stack([v.float() for v in per_seq], -1)
    per_token = pad_to(torch.stack([kl, mask], -1), cfg.max_new_tokens).flatten(1)
    rows_global = world.gather_rows(torch.cat([per_seq, per_token], -1))  # one gather for both
    per_seq, per_token = rows_global[:, : per_seq.shape[1]], rows_global[:, per_seq.shape[1] :].unflatten(1, (-1, 2))
    texts = world.gather_list(batch.texts)
    record = run.monitor.log_step(
        batch.step,
        kl=per_token[..., 0].contiguous(),
        mask=per_token[..., 1].contiguous(),
        kl_coef=kl_coef,
        reward=per_seq[:, 0],
        gold_reward=per_seq[:, 3] if run.gold_fn else None,
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
        seconds=time.perf_counter() - batch.started,
        **scores.mismatch,
    )
    return StepRecord(record, per_seq, texts)
