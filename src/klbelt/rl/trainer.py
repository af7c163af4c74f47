"""The RLHF loop: rollouts -> rewards shaped with KL -> advantages -> PPO -> controller.

Read ``train`` top to bottom: every step of one update is in that function.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..kl import aggregate, kl_per_token
from ..shaping import shape_rewards
from .advantages import gae, whiten
from .config import TrainConfig
from .critic import ValueModel
from .distributed import World
from ..monitor import KLMonitor
from .io import JsonlLog, atomic_torch_save, atomic_write_text, check_writable, read_jsonl
from .lora import Reference, apply_lora, autocast, is_lora, load_policy_state, policy_state, resolve_bf16
from .losses import ppo_policy_loss, ppo_value_loss
from .precision import MasterWeights
from .rollout import Rollout, response_logprobs, sample, set_fused_head
from .samplers import RolloutCorrection, make_sampler
from .text_metrics import distinct_n, exclaim_rate
from .token_log import TOKEN_KL_FILE, token_kl_record

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
    gains = dict(zip(("kp", "ki", "kd"), cfg.pid_gains)) if cfg.pid_gains else {}
    return control.PIDKLController(init_kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, unit=cfg.kl_unit, **gains)


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
    """Two float64 sums over all parameters (a model or a list of tensors): enough to tell two reference models apart."""
    params = model.parameters() if hasattr(model, "parameters") else model
    with torch.no_grad():
        flat = [p.detach().double().reshape(-1) for p in params]
        return [float(sum(f.sum() for f in flat)), float(sum(f.square().sum() for f in flat))]


def checkpoint_bytes(*masters: MasterWeights | None) -> int:
    """About the size of a checkpoint: each model's weights, fp32 masters and AdamW's two fp32 moments."""
    total = 0
    for m in masters:
        if m is not None:
            per_param = 4 * (2 + m.active)
            total += sum(p.numel() * (p.element_size() + per_param) for p in m.model_params)
    return total


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

    Data parallel: when torch.distributed is initialized (e.g. under
    ``torchrun``), ``cfg.batch_size`` is the *global* batch. Each rank samples,
    scores and trains on its contiguous share of every update's prompts;
    gradients are averaged by DistributedDataParallel; every mean (losses,
    whitening, the KL fed to the controller, the metrics) is taken over the
    whole global batch from summed sums and counts. Every rank therefore holds
    the same beta at every step and returns the same metrics, and a run on N
    processes computes what one process computes on the same global batch.
    Only rank 0 writes files.
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    world = World.current()
    n_prompts_per_step = cfg.batch_size // cfg.group_size
    if n_prompts_per_step % world.size or (cfg.batch_size // world.size) % cfg.minibatches:
        raise ValueError(
            f"config batch_size {cfg.batch_size} (= {n_prompts_per_step} prompts x group_size {cfg.group_size}) must split "
            f"into {world.size} processes of whole prompt groups, each a multiple of minibatches ({cfg.minibatches})"
        )
    out = Path(cfg.out)
    check_writable(out)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy.to(device).eval()  # eval(): no dropout, so sampled and trained log-probs agree
    if cfg.lora_rank and not is_lora(policy):
        policy = apply_lora(policy, cfg.lora_rank, cfg.lora_alpha)
    use_bf16 = resolve_bf16(cfg.bf16, device)  # autocast for the differentiated passes only
    set_fused_head(cfg.fused_head)  # response log-probs from hidden states in row blocks (klbelt.kl.fused)
    # Under LoRA (and no explicit reference) the reference is the policy with its adapters disabled.
    if ref_policy is None and is_lora(policy):
        reference = Reference(policy)
    else:
        reference = Reference(policy, (ref_policy if ref_policy is not None else copy.deepcopy(policy)).to(device).eval().requires_grad_(False))
    critic = ValueModel.from_policy(policy).to(device).eval() if cfg.advantage == "gae" else None
    # Forward passes that are differentiated go through the DDP wrappers (gradient all-reduce);
    # sampling and no-grad scoring use the bare models.
    train_policy, train_critic = world.wrap(policy), world.wrap(critic) if critic else None
    # bf16/fp16 models: the optimizers step fp32 master copies (see klbelt.rl.precision)
    policy_master, critic_master = MasterWeights(policy), MasterWeights(critic) if critic else None
    policy_opt = torch.optim.AdamW(policy_master.params(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(critic_master.params(), lr=cfg.critic_lr) if critic else None
    # A full disk must stop the run now, not at its first checkpoint: room for two checkpoints
    # (the one being written beside the last one) and the logs.
    check_writable(out, need_bytes=2 * checkpoint_bytes(policy_master, critic_master) + (16 << 20))
    controller = make_controller(cfg)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    metrics_log, samples_log = JsonlLog(out / "metrics.jsonl"), JsonlLog(out / "samples.jsonl")
    token_log = JsonlLog(out / TOKEN_KL_FILE)  # per-token KL of a few responses per step, for the report
    ckpt_path = out / "checkpoint.pt"
    start = 0
    if resume and not ckpt_path.exists():
        # killed before its first checkpoint: nothing to continue from, and the run is
        # deterministic, so starting it over finishes it exactly as an uninterrupted run would
        warnings.warn(f"resume: no checkpoint in {out} yet; starting the run from step 0", RuntimeWarning)
        resume = False
    if resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["ref_fingerprint"] != fingerprint(reference.base_parameters()):
            raise ValueError(
                f"resume: the reference model differs from the one the run in {out} started with; "
                "resume with the same model (the policy's weights come from the checkpoint)"
            )
        load_policy_state(policy, state["policy"])
        policy_master.load_state_dict(state.get("policy_master"))
        policy_opt.load_state_dict(state["policy_opt"])
        if critic:
            critic.load_state_dict(state["critic"])
            critic_master.load_state_dict(state.get("critic_master"))
            critic_opt.load_state_dict(state["critic_opt"])
        controller.load_state_dict(state["controller"])
        sample_gen.set_state(state["sample_gen"])
        shuffle_gen.set_state(state["shuffle_gen"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    replayed = [r for r in read_jsonl(metrics_log.path) if r["step"] < start] if start else []
    if world.is_main:
        if not resume:
            for log in (metrics_log, samples_log, token_log):
                log.path.unlink(missing_ok=True)
        metrics_log.keep_steps_before(start)
        samples_log.keep_steps_before(start)
        token_log.keep_steps_before(start)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    # report_to: metrics and alerts also to csv / tensorboard / wandb / mlflow under `out` (metrics.jsonl is metrics_log)
    extra_sinks = [k for k in dict.fromkeys(cfg.report_to or ()) if k != "jsonl"] if world.is_main else []
    monitor = KLMonitor(out if extra_sinks else None, sinks=extra_sinks, warn=warn_alerts and world.is_main)
    replay = KLMonitor(sinks=(), warn=False)  # re-derive the rules' state of a resumed run, silently
    for old in replayed:
        replay.log_metrics(old["step"], {k: v for k, v in old.items() if k != "alerts"})
    monitor.history, monitor.engine = replay.history, replay.engine

    def save_checkpoint(next_step: int) -> None:
        state = {
            "step": next_step,
            "policy": policy_state(policy),
            "policy_master": policy_master.state_dict(),
            "policy_opt": policy_opt.state_dict(),
            "critic": critic.state_dict() if critic else None,
            "critic_master": critic_master.state_dict() if critic else None,
            "critic_opt": critic_opt.state_dict() if critic else None,
            "controller": controller.state_dict(),
            "sample_gen": sample_gen.get_state(),
            "shuffle_gen": shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
            "ref_fingerprint": ref_print,
        }
        atomic_torch_save(state, ckpt_path)

    ref_print = fingerprint(reference.base_parameters())
    group = world.group
    rows = world.shard(cfg.batch_size)  # this rank's rows of the global batch
    # the sampler mu that draws the rollouts, and the correction when mu is not the trained pi
    draw = make_sampler(cfg.sampler)
    correction = RolloutCorrection(cfg.sampler, cfg.rollout_correction, cfg.is_cap, tuple(cfg.is_band) if cfg.is_band else None)
    history = []
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        kl_coef = float(controller.kl_coef)

        # 1. Rollouts: sample responses; keep the sampling log-probs as the "old" policy's.
        #    Every rank tokenizes the global batch and draws the global batch's uniforms
        #    (same padding, same random stream), then samples its own rows.
        idx = prompt_indices(step, len(prompts), n_prompts_per_step, cfg.seed)
        batch_prompts = [prompts[i] for i in idx for _ in range(cfg.group_size)]
        enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
        uniforms = torch.rand(cfg.batch_size, cfg.max_new_tokens, generator=sample_gen, device=device)
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
        texts = tokenizer.batch_decode(roll.responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()), skip_special_tokens=True)

        # 2. Score: proxy reward, reference log-probs (same temperature), values.
        scores = call_reward(reward_fn, texts, roll).to(device)
        with torch.no_grad():
            ref_logprobs = reference.logprobs(roll, cfg.temperature)
            # pi's log-probs of mu's tokens (the sampler's own when mu is pi), weights pi/mu or None
            old_logprobs, is_weights, mismatch = correction(policy, roll, cfg.temperature, use_bf16)
            old_values = critic(roll) if critic else None
        n_tokens = mask.sum(-1).clamp_min(1)
        ref_nll = -(ref_logprobs * mask).sum(-1) / n_tokens  # per sample, nats/token

        # 3. Rewards: -beta * k1 per token plus the score on the last token ("reward"),
        #    or the score alone with the KL term in the loss ("loss"). Then advantages.
        shaped = shape_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef if cfg.kl_in == "reward" else 0.0, "k1",
                               log_ratio_clamp=cfg.log_ratio_clamp, clamp_gradient=cfg.clamp_gradient)
        # the KL the controller and the metrics see is never clamped: it is the run's true drift
        kl = (old_logprobs - ref_logprobs) * mask if cfg.log_ratio_clamp else shaped.kl
        if is_weights is not None:  # tokens drawn from mu: w * k1 estimates KL(pi||ref)
            kl = kl * is_weights
        if critic:
            advantages, returns = gae(shaped.rewards, old_values, mask, cfg.gamma, cfg.lam)
        else:
            # critic-free: reward-to-go minus the mean total return of the sample's group
            to_go = shaped.rewards.flip(-1).cumsum(-1).flip(-1)
            totals = shaped.rewards.sum(-1).reshape(-1, cfg.group_size)
            baseline = totals.mean(-1, keepdim=True).expand_as(totals).reshape(-1, 1)
            advantages, returns = (to_go - baseline) * mask, None
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, group=group)
        if is_weights is not None:  # w >= 0, so w * PPO's clipped term = PPO's term with advantage w * A
            advantages = advantages * is_weights

        # 4. PPO: epochs x minibatches of clipped policy (and value) updates. Losses are
        #    global means (sum over ranks / global count); DDP averages gradients over the
        #    ranks, so each rank's loss is scaled by the number of ranks to give the gradient
        #    of the global mean.
        stats, entropy_sums = [], []
        local_batch = rows.stop - rows.start
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(local_batch, generator=shuffle_gen).to(device)
            for mb in order.split(local_batch // cfg.minibatches):
                mb_roll = roll.select(mb)
                with autocast(device, use_bf16):
                    logprobs, entropy = response_logprobs(train_policy, mb_roll, cfg.temperature, with_entropy=True)
                pg_loss, pg_stats = ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range, group=group)
                loss = pg_loss
                if cfg.kl_in == "loss":
                    kl_term = kl_per_token(logprobs, ref_logprobs[mb], cfg.kl_estimator,
                                           log_ratio_clamp=cfg.log_ratio_clamp, clamp_gradient=cfg.clamp_gradient,
                                           weights=None if is_weights is None else is_weights[mb])
                    loss = loss + kl_coef * aggregate(kl_term, mask[mb], "token-mean", group=group)
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(entropy, mask[mb], "token-mean", group=group)
                check_finite(loss, "policy", step, ckpt_path)  # a global value: every rank stops together
                (loss * world.size).backward()
                policy_master.grads_to_master()
                torch.nn.utils.clip_grad_norm_(policy_master.params(), cfg.max_grad_norm)
                policy_opt.step()
                policy_opt.zero_grad(set_to_none=True)  # free the gradients before the critic's pass
                policy_master.to_model()
                vf_loss = torch.zeros(())
                if critic:
                    with autocast(device, use_bf16):
                        values = train_critic(mb_roll)
                    vf_loss = ppo_value_loss(values.float(), old_values[mb], returns[mb], mask[mb], cfg.value_clip, group=group)
                    check_finite(vf_loss, "value", step, ckpt_path)
                    (cfg.vf_coef * world.size * vf_loss).backward()
                    critic_master.grads_to_master()
                    torch.nn.utils.clip_grad_norm_(critic_master.params(), cfg.max_grad_norm)
                    critic_opt.step()
                    critic_opt.zero_grad(set_to_none=True)
                    critic_master.to_model()
                stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["clip_frac"], pg_stats["approx_kl"]]))
                entropy_sums.append(((entropy * mask[mb]).sum(), mask[mb].sum()))  # reduced with the step's sums

        # 5. The KL belt: feed the observed KL, in the controller's unit, to the controller.
        #    Global sum / global count over all ranks: the same number, and so the same beta, on
        #    every rank. The step's other global sums (entropy, k3) travel in the same all-reduce.
        n_seqs = (mask.sum(-1) > 0).sum()
        entropy_sum, entropy_count = (sum(x) for x in zip(*entropy_sums))
        k3_sum = (kl_per_token(old_logprobs, ref_logprobs, "k3", weights=is_weights) * mask).sum()
        sums = [(kl * mask).sum(), mask.sum() if controller.unit == "token-mean" else n_seqs, entropy_sum, entropy_count, k3_sum, mask.sum()]
        kl_sum, kl_count, entropy_sum, entropy_count, k3_sum, n_tokens = world.all_sum(torch.stack(sums).double()).tolist()
        observed_kl = kl_sum / kl_count if kl_count else 0.0  # nats/token, or nats/sequence for "seq-sum"
        controller.update(observed_kl, n_steps=cfg.batch_size)

        # 6. Metrics (one object per update, via the KL monitor and its health rules) from the
        #    global batch gathered on every rank, samples, checkpoint.
        pg, vf, clip_frac, approx_kl = torch.stack(stats).mean(0).tolist()
        entropy_mean = entropy_sum / max(entropy_count, 1.0)
        k3 = k3_sum / max(n_tokens, 1.0)
        gold = gold_fn(texts, ref_nll.cpu()) if gold_fn else None
        per_seq = [scores, ref_nll, mask.sum(-1)] + ([torch.as_tensor(gold, dtype=torch.float32, device=device)] if gold_fn else [])
        per_seq = torch.stack([v.float() for v in per_seq], -1)
        per_token = pad_to(torch.stack([kl, mask], -1), cfg.max_new_tokens).flatten(1)
        rows_global = world.gather_rows(torch.cat([per_seq, per_token], -1))  # one gather for both
        per_seq, per_token = rows_global[:, : per_seq.shape[1]], rows_global[:, per_seq.shape[1] :].unflatten(1, (-1, 2))
        texts = world.gather_list(texts)
        record = monitor.log_step(
            step,
            kl=per_token[..., 0].contiguous(),
            mask=per_token[..., 1].contiguous(),
            kl_coef=kl_coef,
            reward=per_seq[:, 0],
            gold_reward=per_seq[:, 3] if gold_fn else None,
            entropy=entropy_mean,
            kl_k3=float(k3),
            next_kl_coef=float(controller.kl_coef),
            exclaim_rate=exclaim_rate(texts),
            distinct_1=distinct_n(texts, 1),
            distinct_2=distinct_n(texts, 2),
            ref_nll=float(per_seq[:, 1].mean()),
            response_len=float(per_seq[:, 2].mean()),
            pg_loss=pg,
            vf_loss=vf,
            clip_frac=clip_frac,
            approx_kl=approx_kl,
            seconds=time.perf_counter() - t0,
            **mismatch,
        )
        if world.is_main:
            metrics_log.append(record)
            if step % cfg.samples_every == 0 or step == cfg.steps - 1:
                samples_log.append({"step": step, "prompts": batch_prompts[:4], "responses": texts[:4], "rewards": per_seq[:4, 0].tolist()})
            token_log.append(token_kl_record(step, batch_prompts[rows], roll.responses, mask, kl, tokenizer))  # rank 0's first rows
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
                metrics_log.sync()
                samples_log.sync()
                token_log.sync()
                save_checkpoint(step + 1)
        history.append(record)
        if on_step:
            on_step(record)
    # drop the DDP wrappers (and their reducers) now, not at some later collection after the
    # caller has destroyed the process group
    del train_policy, train_critic
    if world.size > 1:
        import gc

        gc.collect()
    monitor.close()
    if world.is_main:
        write_run_report(out)
    return history


def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``x`` ``[B, R, ...]`` to ``length`` (ranks' responses may end at different lengths)."""
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def write_run_report(out: Path) -> Path | None:
    """The monitor's HTML report of the whole run (all of metrics.jsonl); skipped without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from ..monitor import write_report

    from ..monitor.token_report import find_token_file

    return write_report(read_jsonl(out / "metrics.jsonl"), out / "report.html", title=f"klbelt run: {out}",
                        token_file=find_token_file(out))
