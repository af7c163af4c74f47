"""The RLHF loop: rollouts -> rewards shaped with KL -> advantages -> PPO -> controller.

Read ``train`` top to bottom: the options are chosen once before the loop (a
:class:`klbelt.rl.run.Run`, which also puts the caller's models back when the run
ends, however it ends), and each step of one update is a line calling a named
piece of :mod:`klbelt.rl.update`. The run's state and checkpoint are
:class:`klbelt.rl.run_state.RunState`; its folder and logs are
:class:`klbelt.rl.run_files.RunFiles`.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .config import TrainConfig
from .critic import ValueModel
from .device import check_device
from .distributed import World
from .hf import unwrap
from .io import check_writable
from .lora import adapters_at_zero, apply_lora, is_lora
from .reward_model import RewardFn
from .run import Run
from .run_files import RunFiles
from .run_state import RunState
from .scoring import Reference
from .update import TrainingError, observe_kl, ppo_epochs, sample_batch, score_batch, shape_rewards_with_kl, step_metrics

__all__ = ["train", "TrainingError"]


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
    world = World.current()
    check_batch(cfg, prompts, world)
    check_writable(cfg.out)
    device = check_device(cfg.device)  # 'cuda' without CUDA: refused here, before a model moves
    torch.manual_seed(cfg.seed)
    prepare_tokenizer(tokenizer)

    # The run's options, chosen once (klbelt.rl.run.Run); every change to the caller's models is undone when it ends.
    with Run(cfg, world, device, tokenizer, prompts, reward_fn, gold_fn) as run:
        policy, reference = policy_and_reference(cfg, policy, ref_policy, device)  # the policy as given (cfg.reference), frozen
        critic = ValueModel.from_policy(policy).to(device).eval() if cfg.advantage == "gae" else None
        run.use_models(policy, reference, critic)  # on the attention kernel cfg names, restored at the end

        # The run's state, its files, and where it starts (a resumed run continues from its checkpoint).
        state = RunState.create(cfg, policy, critic, reference.base_parameters(), device,
                                reference_model=reference.model if cfg.ref_sync_every else None)
        # A full disk must stop the run now, not at its first checkpoint: room for two checkpoints and the logs.
        check_writable(cfg.out, need_bytes=2 * state.checkpoint_bytes() + (16 << 20))
        files = RunFiles(cfg, world)
        start = state.step if resume and state.resume(files.out, device) else 0
        run.watch(files.open(start, warn_alerts=warn_alerts))
        run.wrap_for_training()
        run.hold_base_in_bf16()  # after the reference's fingerprint, which reads the base as given

        history = []
        for step in range(start, cfg.steps):
            kl_coef = float(state.controller.kl_coef)
            # 1. Rollouts: the update's prompts, responses drawn by the sampler.
            batch = sample_batch(run, step, state.sample_gen)
            # 2. Score: proxy reward r, reference and policy log-probs of the sampled tokens, values.
            scores = score_batch(run, batch)
            # 3. The article's reward: r - beta * KL per token (beta 0 here when the KL is in the loss); advantages.
            shaped, kl = shape_rewards_with_kl(run, scores, batch.mask, run.placement.reward_coef(kl_coef))
            advantages, returns = run.advantages(shaped.rewards, scores.old_values, batch.mask, scores.is_weights)
            # 4. PPO: clipped policy (+ beta * KL when in the loss) and value updates, epochs x minibatches.
            ppo = ppo_epochs(run, state, batch, scores, advantages, returns, kl_coef)
            # 5. The KL belt: the observed KL, in the controller's unit, sets the next beta.
            observed = observe_kl(run, batch, scores, kl, ppo, state.controller.unit)
            state.controller.update(observed.kl, n_steps=cfg.batch_size)
            # 6. Metrics, samples, checkpoint.
            logged = step_metrics(run, batch, scores, kl, ppo, observed, betas=(kl_coef, state.controller.kl_coef))
            if cfg.ref_sync_every and (step + 1) % cfg.ref_sync_every == 0:  # the next update's reference is this policy
                sync_reference(reference, policy)
                state.ref_synced = True
                logged.record["ref_sync"] = 1  # the event (a number: the monitor reads every field as one), in metrics.jsonl and the report's plots
            files.write_step(batch, logged, kl, tokenizer)
            if files.checkpoint_due(step):
                files.sync()
                state.step = step + 1
                state.save(files.checkpoint)
            history.append(logged.record)
            if on_step:
                on_step(logged.record)
    files.write_report()
    return history


def check_batch(cfg: TrainConfig, prompts: list[str], world: World) -> None:
    """The batch must split into whole prompt groups per rank, each a multiple of the minibatches."""
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    n_prompts_per_step = cfg.batch_size // cfg.group_size
    if n_prompts_per_step % world.size or (cfg.batch_size // world.size) % cfg.minibatches:
        raise ValueError(
            f"config batch_size {cfg.batch_size} (= {n_prompts_per_step} prompts x group_size {cfg.group_size}) must split "
            f"into {world.size} processes of whole prompt groups, each a multiple of minibatches ({cfg.minibatches})"
        )


def policy_and_reference(cfg: TrainConfig, policy, ref_policy, device: torch.device):
    """The trained policy (with LoRA adapters when ``cfg.lora_rank``) and its frozen reference.

    ``cfg.reference``: ``"initial"`` (the default) is the policy as given, frozen: a
    policy that arrives with adapters (RL after a LoRA SFT) gets a frozen copy of
    itself, adapters included; ``"base"`` disables every adapter (the bare base
    model). Adapters added here (or given) at zero leave the two the same model,
    and the reference is the policy with its adapters off (no second copy),
    unless ``cfg.ref_sync_every`` will overwrite the reference (then a frozen copy).
    An explicit ``ref_policy`` is the reference of a policy without adapters.
    """
    policy.to(device).eval()  # eval(): no dropout, so sampled and trained log-probs agree
    arrived_with_adapters = is_lora(policy) and not adapters_at_zero(policy)  # zero adapters: the base itself
    if ref_policy is not None and arrived_with_adapters:
        raise ValueError(f"config reference {cfg.reference!r} and ref_policy (an explicit reference model) both name the "
                         "reference of a policy that starts with adapters; pass ref_policy=None (reference 'initial': the "
                         "policy as given, 'base': adapters off), or a policy without adapters")
    if cfg.lora_rank and not is_lora(policy):
        policy = apply_lora(policy, cfg.lora_rank, cfg.lora_alpha)
    copy_needed = cfg.ref_sync_every > 0 or (arrived_with_adapters and cfg.reference == "initial")
    if ref_policy is None and is_lora(policy) and not copy_needed:
        return policy, Reference(policy, fused=cfg.fused_head)
    if ref_policy is not None and cfg.ref_sync_every:
        mine, theirs = set(unwrap(policy).state_dict()), set(ref_policy.state_dict())
        if mine != theirs:
            raise ValueError(f"config ref_sync_every ({cfg.ref_sync_every}) copies the policy's weights into the reference, "
                             f"but ref_policy's weights are named differently ({len(theirs ^ mine)} names differ, e.g. "
                             f"{sorted(theirs ^ mine)[0]!r}); pass ref_policy=None (the reference is then a copy of the policy)")
        ref_policy = copy.deepcopy(ref_policy)  # the syncs overwrite it: never the caller's model
    frozen = ref_policy if ref_policy is not None else copy.deepcopy(policy)
    return policy, Reference(policy, frozen.to(device).eval().requires_grad_(False), fused=cfg.fused_head)


@torch.no_grad()
def sync_reference(reference: Reference, policy) -> None:
    """TR-DPO's hard update: the reference becomes the current policy (its weights copied into the frozen model)."""
    source = unwrap(policy).state_dict()
    for name, tensor in reference.model.state_dict().items():
        tensor.copy_(source[name])


def prepare_tokenizer(tokenizer) -> None:
    """Left padding for prompts; EOS as the pad token when there is none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


