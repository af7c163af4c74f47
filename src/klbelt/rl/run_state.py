"""What a run carries from one update to the next, and its checkpoint.

:class:`RunState` holds the trained models, their fp32 masters and optimisers,
the KL controller, the two random streams (sampling and minibatch shuffling)
and the next step. It owns the checkpoint format (``save``/``load``), the reference
fingerprint that stops a resume with a different reference model.
The run folder's logs, and the replay that gives a resumed run's health rules
their state, are :mod:`klbelt.rl.run_files`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .hf import is_lora, unwrap
from .io import atomic_torch_save
from .precision import MasterWeights
from .run_files import CHECKPOINT_FILE, read_steps_before, replay_monitor  # noqa: F401  (their old path)


def fingerprint(model) -> list[float]:
    """Two float64 sums over all parameters (a model or a list of tensors): enough to tell two reference models apart."""
    params = model.parameters() if hasattr(model, "parameters") else model
    total, squares = 0, 0  # one float64 tensor at a time (all at once was 8 bytes a parameter: 1.1 GB on SmolLM2)
    with torch.no_grad():
        for p in params:
            f = p.detach().double()
            total, squares = total + f.sum(), squares + f.square().sum()
    return [float(total), float(squares)]


def checkpoint_bytes(*masters: MasterWeights | None) -> int:
    """About the size of a checkpoint: each model's weights, fp32 masters and AdamW's two fp32 moments."""
    total = 0
    for m in masters:
        if m is not None:
            per_param = 4 * (2 + m.active)
            total += sum(p.numel() * (p.element_size() + per_param) for p in m.model_params)
    return total


def policy_state(policy) -> dict:
    """What a checkpoint keeps of the policy: every weight, or only the adapters under LoRA
    (the base weights are the reference, restored by loading the same model)."""
    model = unwrap(policy)
    if is_lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def load_policy_state(policy, state: dict) -> None:
    model = unwrap(policy)
    if is_lora(model):
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise ValueError(f"resume: the checkpoint has no LoRA weights for {missing[0]} (was it written with the same lora_rank?)")
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state)


def make_controller(cfg: TrainConfig):
    """The KL controller ``cfg`` names, in its unit (``cfg.kl_unit``)."""
    from .. import control

    if cfg.controller == "fixed":
        return control.FixedKLController(cfg.kl_coef, unit=cfg.kl_unit)
    if cfg.controller in ("adaptive", "proportional"):
        rule = "step" if cfg.controller == "adaptive" else "proportional"
        return control.AdaptiveKLController(
            init_kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, horizon=cfg.horizon, rule=rule, unit=cfg.kl_unit
        )
    gains = dict(zip(("kp", "ki", "kd"), cfg.pid_gains)) if cfg.pid_gains else {}
    return control.PIDKLController(init_kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, unit=cfg.kl_unit,
                                   smoothing=cfg.pid_smoothing, min_kl_coef=cfg.pid_min_kl_coef, warmup=cfg.pid_warmup,
                                   **gains)


@dataclass
class RunState:
    """The models, optimisers, controller, random streams and next step of one run.

    ``policy`` and ``critic`` are the bare models (the DDP wrappers that train
    them are the trainer's); under bf16/fp16 weights the optimisers step the
    fp32 masters (:class:`klbelt.rl.precision.MasterWeights`).
    """

    cfg: TrainConfig
    policy: torch.nn.Module
    critic: torch.nn.Module | None
    policy_master: MasterWeights
    critic_master: MasterWeights | None
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    controller: object
    sample_gen: torch.Generator  # the sampling uniforms of every update (on the CPU: a GPU run samples what a CPU run samples)
    shuffle_gen: torch.Generator  # the PPO minibatch order
    ref_fingerprint: list[float] = field(default_factory=list)
    step: int = 0  # the next update to run
    reference_model: torch.nn.Module | None = None  # the frozen reference, when ref_sync_every may overwrite it
    ref_synced: bool = False  # a sync has overwritten the reference: the checkpoint keeps its weights

    @classmethod
    def create(cls, cfg: TrainConfig, policy, critic, reference_params, device: torch.device,
               reference_model=None) -> "RunState":
        """A fresh run: AdamW on each model's fp32 masters, the controller at its initial beta, seeded streams."""
        policy_master = MasterWeights(policy)
        critic_master = MasterWeights(critic) if critic else None
        return cls(
            cfg=cfg,
            policy=policy,
            critic=critic,
            policy_master=policy_master,
            critic_master=critic_master,
            policy_opt=torch.optim.AdamW(policy_master.params(), lr=cfg.lr, weight_decay=cfg.weight_decay),
            critic_opt=torch.optim.AdamW(critic_master.params(), lr=cfg.critic_lr) if critic else None,
            controller=make_controller(cfg),
            sample_gen=torch.Generator().manual_seed(cfg.seed),
            shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1),
            ref_fingerprint=fingerprint(reference_params),
            reference_model=reference_model,
        )

    def checkpoint_bytes(self) -> int:
        return checkpoint_bytes(self.policy_master, self.critic_master)

    def save(self, path: Path | str) -> None:
        """Write the checkpoint atomically (the previous one stays whole until the new one is complete)."""
        critic = self.critic
        state = {
            "step": self.step,
            "policy": policy_state(self.policy),
            "policy_master": self.policy_master.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "critic": critic.state_dict() if critic else None,
            "critic_master": self.critic_master.state_dict() if critic else None,
            "critic_opt": self.critic_opt.state_dict() if critic else None,
            "controller": self.controller.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "shuffle_gen": self.shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
            "ref_fingerprint": self.ref_fingerprint,
        }
        if self.ref_synced:  # ref_sync_every: the reference is no longer the initial one
            state["reference"] = self.reference_model.state_dict()
        atomic_torch_save(state, path)

    def load(self, path: Path | str, device: torch.device) -> int:
        """Restore everything from the checkpoint at ``path``; returns the step to continue from.

        Refuses a checkpoint written with a different reference model: the KL would
        silently change meaning. The policy's weights come from the checkpoint.
        """
        state = torch.load(path, map_location=device, weights_only=False)
        if state["ref_fingerprint"] != self.ref_fingerprint:
            raise ValueError(
                f"resume: the reference model differs from the one the run in {Path(path).parent} started with; "
                "resume with the same model (the policy's weights come from the checkpoint)"
            )
        load_policy_state(self.policy, state["policy"])
        self.policy_master.load_state_dict(state.get("policy_master"))
        self.policy_opt.load_state_dict(state["policy_opt"])
        if self.critic:
            self.critic.load_state_dict(state["critic"])
            self.critic_master.load_state_dict(state.get("critic_master"))
            self.critic_opt.load_state_dict(state["critic_opt"])
        if "reference" in state:
            self.reference_model.load_state_dict(state["reference"])
            self.ref_synced = True
        self.controller.load_state_dict(state["controller"])
        self.sample_gen.set_state(state["sample_gen"].cpu())  # map_location moved the CPU streams' states too
        self.shuffle_gen.set_state(state["shuffle_gen"].cpu())
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        return self.step

    def resume(self, out: Path, device: torch.device) -> bool:
        """Load ``out``'s checkpoint if there is one; False (and a warning) if the run died before its first.

        The run is deterministic, so starting over finishes it exactly as an
        uninterrupted run would.
        """
        path = Path(out) / CHECKPOINT_FILE
        if not path.exists():
            warnings.warn(f"resume: no checkpoint in {out} yet; starting the run from step 0", RuntimeWarning)
            return False
        self.load(path, device)
        return True
