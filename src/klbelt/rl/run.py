"""One training run's set-up, built once by ``train()``: what every step needs, and what must be put back.

A :class:`Run` carries the config, the process world, the device, the precision,
the tokenizer and prompts, the reward and gold functions, the sampler and its
:class:`~klbelt.rl.sampling.SamplingParams`, the importance correction, the KL
placement, the advantage estimator and the models (policy, its DDP wrapper,
reference, critic). The step functions of :mod:`klbelt.rl.update` take it first.

It is a context manager that owns every change the run makes to what the caller
gave it (the attention implementation of every model, the LoRA base held in
bf16, the DDP wrappers, the sampler's worker, the monitor and its sinks): each is
registered as it is made and undone when the block ends, so a failure anywhere
after the run starts (a vLLM sampler with no python, a full disk, a resume
refused) leaves the caller's model as it was. :class:`~klbelt.rl.run_state.RunState`
stays what the checkpoint holds.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable

import torch

from .advantages import Advantages
from .attention import resolve as resolve_attention, restore_attention, set_attention_of
from .config import TrainConfig
from .distributed import World
from .importance import RolloutCorrection
from .losses import kl_placement
from .precision import hold_base_in_bf16, resolve_bf16, restore_fp32
from .reward_model import RewardFn
from .sampling import SamplingParams, make_sampler


class Run:
    """What every step of one run needs; ``with Run(...) as run:`` restores the caller's models when it ends."""

    def __init__(self, cfg: TrainConfig, world: World, device: torch.device, tokenizer, prompts: list[str],
                 reward_fn: RewardFn, gold_fn: Callable | None = None):
        self.cfg, self.world, self.device = cfg, world, device
        self.tokenizer, self.prompts = tokenizer, prompts
        self.reward_fn, self.gold_fn = reward_fn, gold_fn
        self.bf16 = resolve_bf16(cfg.bf16, device)  # autocast for the differentiated passes only
        self.fused_head = cfg.fused_head  # log-probs from hidden states in row blocks (klbelt.kl.fused), or full logits
        self.sampling = SamplingParams.from_config(cfg, tokenizer) if tokenizer is not None else None
        self.sampler = make_sampler(cfg.sampler, vllm_python=cfg.vllm_python)  # the sampler mu that draws the rollouts
        self.correction = RolloutCorrection(cfg.sampler, cfg.rollout_correction, cfg.is_cap,
                                            tuple(cfg.is_band) if cfg.is_band else None,
                                            filtered=bool(cfg.top_k) or cfg.top_p < 1.0,  # mu: the filtered distribution
                                            fused=cfg.fused_head)
        self.placement = kl_placement(cfg)  # -beta * k1 in the reward, or beta * k2/k3 in the loss
        self.advantages = Advantages.from_config(cfg, world.group)  # GAE with the critic, or the group baseline
        self.rows = world.shard(cfg.batch_size)  # this rank's rows of the global batch
        self.policy = self.reference = self.critic = None
        self.train_policy = self.train_critic = None  # the DDP wrappers the differentiated passes go through
        self.monitor = None
        self._undo = contextlib.ExitStack()

    def __enter__(self) -> "Run":
        self._undo.callback(lambda: getattr(self.sampler, "close", lambda: None)())  # a vLLM worker stops, a copy is freed
        return self

    def __exit__(self, *exc) -> None:
        self._undo.close()

    def use_models(self, policy, reference, critic=None) -> None:
        """The run's policy, :class:`~klbelt.rl.scoring.Reference` and critic, on the attention kernel the
        config names (every pass: the sampler copies built from them inherit it); restored at the end."""
        self.policy, self.reference, self.critic = policy, reference, critic
        kernel = resolve_attention(self.cfg.attn_implementation, self.device)
        saved = set_attention_of([policy, reference.model, critic.trunk if critic else None], kernel)
        self._undo.callback(restore_attention, saved)

    def wrap_for_training(self) -> None:
        """Differentiated passes go through DDP wrappers (gradient all-reduce); sampling and scoring use the bare
        models. The wrappers (and their reducers) are dropped when the run ends, not at some later collection after
        the caller has destroyed the process group."""
        self.train_policy = self.world.wrap(self.policy)
        self.train_critic = self.world.wrap(self.critic) if self.critic else None
        self._undo.callback(self._drop_wrappers)

    def _drop_wrappers(self) -> None:
        self.train_policy = self.train_critic = None
        if self.world.size > 1:
            gc.collect()

    def watch(self, monitor):
        """The run's KL monitor; closed when the run ends (a crashed run still ends its W&B / MLflow run and
        flushes its sinks)."""
        self.monitor = monitor
        self._undo.callback(monitor.close)
        return monitor

    def hold_base_in_bf16(self) -> None:
        """Every pass on a LoRA base runs under bf16 autocast (the config refuses ``bf16_base`` with the "policy"
        sampler): its linear weights can be stored as the bf16 values autocast reads (exact; fp32 again, with those
        values, when the run ends, so ``show_samples`` and ``save_pretrained`` outside autocast read fp32)."""
        if self.bf16 and self.cfg.bf16_base and self.reference.shared:
            self._undo.callback(restore_fp32, hold_base_in_bf16(self.policy))
