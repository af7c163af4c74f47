"""The RLHF loop: rollouts -> rewards shaped with KL -> advantages -> PPO -> controller.

Read ``train`` top to bottom: every step of one update is in that function.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..kl import aggregate, kl_per_token
from ..shaping import shape_rewards
from .advantages import gae, whiten
from .config import TrainConfig
from .critic import ValueModel
from ..monitor import KLMonitor
from .io import JsonlLog, atomic_torch_save, atomic_write_text, check_writable, read_jsonl
from .losses import ppo_policy_loss, ppo_value_loss
from .rollout import Rollout, response_logprobs, sample
from .text_metrics import distinct_n, exclaim_rate

RewardFn = Callable[[list[str]], torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


def make_controller(cfg: TrainConfig):
    from .. import control

    if cfg.controller == "fixed":
        return control.FixedKLController(cfg.kl_coef, unit=cfg.kl_unit)
    if cfg.controller in ("adaptive", "proportional"):
        rule = "step" if cfg.controller == "adaptive" else "proportional"
        return control.AdaptiveKLController(
            init_kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, horizon=cfg.horizon, rule=rule, unit=cfg.kl_unit
        )
    return control.PIDKLController(init_kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, unit=cfg.kl_unit)


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


def fingerprint(model) -> list[float]:
    """Two float64 sums over all parameters: enough to tell two reference models apart."""
    with torch.no_grad():
        flat = [p.detach().double().reshape(-1) for p in model.parameters()]
        return [float(sum(f.sum() for f in flat)), float(sum(f.square().sum() for f in flat))]


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


def train(
    cfg: TrainConfig,
    policy,
    tokenizer,
    prompts: list[str],
    reward_fn: RewardFn,
    *,
    gold_fn: Callable[[list[str], torch.Tensor], torch.Tensor] | None = None,
    ref_policy=None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    warn_alerts: bool = True,
) -> list[dict]:
    """Run ``cfg.steps`` PPO updates of ``policy`` against ``reward_fn`` with a KL belt.

    Args:
        cfg: the configuration (see :class:`TrainConfig`).
        policy: a Hugging Face causal LM; trained in place.
        tokenizer: its tokenizer (left padding is set for prompts).
        prompts: prompt strings.
        reward_fn: texts (responses only) -> ``[B]`` scores (the proxy reward).
        gold_fn: optional (texts, ref_nll ``[B]``) -> ``[B]`` gold scores, logged, never trained on.
        ref_policy: the frozen reference; a copy of ``policy`` at the start by default.
        resume: continue from ``cfg.out``'s checkpoint (metrics after it are dropped and redone).
        on_step: called with each step's metrics (e.g. a progress bar).
        warn_alerts: issue the monitor's health alerts as ``KLHealthWarning`` warnings
            (they are always in the metrics' ``alerts`` field).

    Returns:
        The metrics of the steps run in this call.

    Files in ``cfg.out``: config.json, metrics.jsonl (one object per update, with
    the monitor's KL statistics and health alerts), samples.jsonl, checkpoint.pt
    (policy, critic, optimisers, controller, RNG) and report.html (at the end).
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    out = Path(cfg.out)
    check_writable(out)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy.to(device).eval()  # eval(): no dropout, so sampled and trained log-probs agree
    ref = (ref_policy if ref_policy is not None else copy.deepcopy(policy)).to(device).eval().requires_grad_(False)
    critic = ValueModel.from_policy(policy).to(device).eval() if cfg.advantage == "gae" else None
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr) if critic else None
    controller = make_controller(cfg)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    metrics_log, samples_log = JsonlLog(out / "metrics.jsonl"), JsonlLog(out / "samples.jsonl")
    ckpt_path = out / "checkpoint.pt"
    start = 0
    if resume:
        if not ckpt_path.exists():
            raise ValueError(f"resume: no checkpoint in {out} (expected {ckpt_path})")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["ref_fingerprint"] != fingerprint(ref):
            raise ValueError(
                f"resume: the reference model differs from the one the run in {out} started with; "
                "resume with the same model (the policy's weights come from the checkpoint)"
            )
        policy.load_state_dict(state["policy"])
        policy_opt.load_state_dict(state["policy_opt"])
        if critic:
            critic.load_state_dict(state["critic"])
            critic_opt.load_state_dict(state["critic_opt"])
        controller.load_state_dict(state["controller"])
        sample_gen.set_state(state["sample_gen"])
        shuffle_gen.set_state(state["shuffle_gen"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    else:
        for log in (metrics_log, samples_log):
            log.path.unlink(missing_ok=True)
    metrics_log.keep_steps_before(start)
    samples_log.keep_steps_before(start)
    monitor = KLMonitor(sinks=(), warn=warn_alerts)
    replay = KLMonitor(sinks=(), warn=False)  # re-derive the rules' state of a resumed run, silently
    for old in read_jsonl(metrics_log.path) if start else []:
        replay.log_metrics(old["step"], {k: v for k, v in old.items() if k != "alerts"})
    monitor.history, monitor.engine = replay.history, replay.engine
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    def save_checkpoint(next_step: int) -> None:
        state = {
            "step": next_step,
            "policy": policy.state_dict(),
            "policy_opt": policy_opt.state_dict(),
            "critic": critic.state_dict() if critic else None,
            "critic_opt": critic_opt.state_dict() if critic else None,
            "controller": controller.state_dict(),
            "sample_gen": sample_gen.get_state(),
            "shuffle_gen": shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
            "ref_fingerprint": ref_print,
        }
        atomic_torch_save(state, ckpt_path)

    ref_print = fingerprint(ref)
    n_prompts_per_step = cfg.batch_size // cfg.group_size
    history = []
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        kl_coef = float(controller.kl_coef)

        # 1. Rollouts: sample responses; keep the sampling log-probs as the "old" policy's.
        idx = prompt_indices(step, len(prompts), n_prompts_per_step, cfg.seed)
        batch_prompts = [prompts[i] for i in idx for _ in range(cfg.group_size)]
        enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
        roll = sample(
            policy,
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_token_id=eos,
            stop_on_eos=cfg.stop_on_eos,
            blocked_token_ids=(eos,) if cfg.block_eos and eos is not None else (),
            pad_token_id=tokenizer.pad_token_id,
            generator=sample_gen,
        )
        mask = roll.response_mask
        texts = tokenizer.batch_decode(roll.responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()), skip_special_tokens=True)

        # 2. Score: proxy reward, reference log-probs (same temperature), values.
        scores = call_reward(reward_fn, texts, roll).to(device)
        with torch.no_grad():
            ref_logprobs = response_logprobs(ref, roll, cfg.temperature)
            old_logprobs = roll.logprobs
            old_values = critic(roll) if critic else None
        n_tokens = mask.sum(-1).clamp_min(1)
        ref_nll = -(ref_logprobs * mask).sum(-1) / n_tokens  # per sample, nats/token

        # 3. Rewards: -beta * k1 per token plus the score on the last token ("reward"),
        #    or the score alone with the KL term in the loss ("loss"). Then advantages.
        shaped = shape_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef if cfg.kl_in == "reward" else 0.0, "k1")
        if critic:
            advantages, returns = gae(shaped.rewards, old_values, mask, cfg.gamma, cfg.lam)
        else:
            # critic-free: reward-to-go minus the mean total return of the sample's group
            to_go = shaped.rewards.flip(-1).cumsum(-1).flip(-1)
            totals = shaped.rewards.sum(-1).reshape(-1, cfg.group_size)
            baseline = totals.mean(-1, keepdim=True).expand_as(totals).reshape(-1, 1)
            advantages, returns = (to_go - baseline) * mask, None
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        # 4. PPO: epochs x minibatches of clipped policy (and value) updates.
        stats = []
        mb_size = cfg.batch_size // cfg.minibatches
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=shuffle_gen).to(device)
            for mb in order.split(mb_size):
                mb_roll = roll.select(mb)
                logprobs, entropy = response_logprobs(policy, mb_roll, cfg.temperature, with_entropy=True)
                pg_loss, pg_stats = ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
                loss = pg_loss
                if cfg.kl_in == "loss":
                    kl_term = kl_per_token(logprobs, ref_logprobs[mb], cfg.kl_estimator)
                    loss = loss + kl_coef * aggregate(kl_term, mask[mb], "token-mean")
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(entropy, mask[mb], "token-mean")
                check_finite(loss, "policy", step, ckpt_path)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                policy_opt.step()
                policy_opt.zero_grad(set_to_none=True)  # free the gradients before the critic's pass
                vf_loss = torch.zeros(())
                if critic:
                    vf_loss = ppo_value_loss(critic(mb_roll), old_values[mb], returns[mb], mask[mb], cfg.value_clip)
                    check_finite(vf_loss, "value", step, ckpt_path)
                    (cfg.vf_coef * vf_loss).backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                    critic_opt.step()
                    critic_opt.zero_grad(set_to_none=True)
                stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["clip_frac"], pg_stats["approx_kl"], aggregate(entropy, mask[mb])]))

        # 5. The KL belt: feed the observed KL, in the controller's unit, to the controller.
        observed_kl = shaped.kl_mean if controller.unit == "token-mean" else shaped.kl_seq_mean
        controller.update(float(observed_kl), n_steps=cfg.batch_size)

        # 6. Metrics (one object per update, via the KL monitor and its health rules),
        #    samples, checkpoint.
        pg, vf, clip_frac, approx_kl, entropy_mean = torch.stack(stats).mean(0).tolist()
        k3 = aggregate(kl_per_token(old_logprobs, ref_logprobs, "k3") * mask, mask)
        record = monitor.log_step(
            step,
            kl=shaped.kl,
            mask=mask,
            kl_coef=kl_coef,
            reward=scores,
            gold_reward=gold_fn(texts, ref_nll.cpu()) if gold_fn else None,
            entropy=entropy_mean,
            kl_k3=float(k3),
            next_kl_coef=float(controller.kl_coef),
            exclaim_rate=exclaim_rate(texts),
            distinct_1=distinct_n(texts, 1),
            distinct_2=distinct_n(texts, 2),
            ref_nll=float(ref_nll.mean()),
            response_len=float(mask.sum(-1).mean()),
            pg_loss=pg,
            vf_loss=vf,
            clip_frac=clip_frac,
            approx_kl=approx_kl,
            seconds=time.perf_counter() - t0,
        )
        metrics_log.append(record)
        if step % cfg.samples_every == 0 or step == cfg.steps - 1:
            samples_log.append({"step": step, "prompts": batch_prompts[:4], "responses": texts[:4], "rewards": scores[:4].tolist()})
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            metrics_log.sync()
            samples_log.sync()
            save_checkpoint(step + 1)
        history.append(record)
        if on_step:
            on_step(record)
    write_run_report(out)
    return history


def write_run_report(out: Path) -> Path | None:
    """The monitor's HTML report of the whole run (all of metrics.jsonl); skipped without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from ..monitor import write_report

    return write_report(read_jsonl(out / "metrics.jsonl"), out / "report.html", title=f"klbelt run: {out}")
