"""klbelt inside TRL: a klbelt controller drives ``GRPOTrainer.beta``, the monitor watches the run.

One line::

    from klbelt.integrations import trl as kltrl
    kltrl.attach(trainer, controller=klbelt.AdaptiveKLController(0.04, target_kl=0.05, unit="token-mean"))
    trainer.train()                                    # or train(resume_from_checkpoint=True)

How it works (checked on TRL 1.0.0 and 1.16.0): ``GRPOTrainer`` keeps beta in
``trainer.beta`` and reads it on every loss computation
(``per_token_loss + self.beta * per_token_kl``), so assigning ``trainer.beta``
between steps changes the next steps' loss. TRL logs ``kl`` as the mean over
completion tokens of k3 = exp(ref - logp) - (ref - logp) - 1 (nats/token,
averaged over the ``logging_steps`` steps since the last log and over
processes), so the controller must be in ``unit="token-mean"``. TRL 1.16
multiplies each token's k3 by the importance ratio pi/pi_old first
(``use_bias_correction_kl=True``, its default): the ratio is 1 when each batch
is used for one update, and the unit is the same either way.

Resume: the controller's ``state_dict()`` is written atomically to
``checkpoint-N/kl_controller.json`` on every save and read back when training
resumes from ``checkpoint-N``; the beta in effect is set from it before the
first resumed step.

beta = 0 (GRPO's default): TRL then loads no reference model and neither
computes nor logs the KL. ``attach(trainer, monitor_only=True)`` scores the
reference itself: TRL's callbacks are never handed the completions, so it wraps
this trainer instance's ``_generate_and_score_completions`` (no subclass needed;
the method is TRL's, 1.0 and 1.16 alike) and, for each generation batch, adds
the KL TRL would have logged (mean over completion tokens of k3, nats/token,
summed over processes) to TRL's own ``kl`` metric, and the seconds it took as
``klbelt/ref_seconds``: one no-grad forward of the reference (the adapters off
under PEFT, or ``ref_model``) and, when TRL kept no ``old_per_token_logps``, one
of the policy. Text-only: multimodal inputs are refused.

Refused, with an error, instead of silently doing nothing:
  * beta == 0 with a controller (or without ``monitor_only``): TRL's loss has
    no KL term for a beta to scale, and TRL logs no KL;
  * ``use_liger_kernel=True`` on TRL 1.0: Liger's fused GRPO loss copies beta
    when the trainer is built, so a changed ``trainer.beta`` is never used
    (TRL 1.16 keeps only Liger's layer kernels, and its loss reads the new beta).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from .._files import atomic_write
from ._checks import check_controller
from .hf import KLMonitorCallback

__all__ = ["KLControllerCallback", "KLMonitorCallback", "ReferenceKL", "attach", "STATE_FILE", "LOGGED_KL_UNIT"]

#: the file holding the controller's state inside each ``checkpoint-N`` folder
STATE_FILE = "kl_controller.json"
#: the unit of the ``kl`` TRL's GRPOTrainer logs (a per-token mean of k3)
LOGGED_KL_UNIT = "token-mean"


def _check_controller(controller) -> None:
    check_controller(controller, LOGGED_KL_UNIT,
                     f"TRL's GRPOTrainer logs kl in {LOGGED_KL_UNIT!r} (mean of k3 over completion tokens, "
                     "nats/token), so give it a per-token target_kl")


def _check_trainer(trainer) -> None:
    if not hasattr(trainer, "beta"):
        raise TypeError(f"trainer must have a `beta` attribute that its loss reads (TRL's GRPOTrainer does), "
                        f"got {type(trainer).__name__} without one")
    beta = trainer.beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise TypeError(f"trainer.beta must be a finite number, got {beta!r}")
    if beta == 0:
        raise ValueError("trainer.beta is 0: TRL then loads no reference model and neither computes nor logs "
                         "the KL, so a controller cannot drive it; build the trainer with GRPOConfig(beta=...) > 0 "
                         "(e.g. the controller's initial kl_coef) and keep the controller's min_kl_coef > 0, or "
                         "watch the KL without driving it: attach(trainer, monitor_only=True)")
    # TRL 1.0 builds Liger's fused GRPO loss (trainer.liger_grpo_loss), which copies beta at construction;
    # TRL 1.16 applies only Liger's layer kernels and its loss still reads trainer.beta, so it is allowed.
    if getattr(trainer, "liger_grpo_loss", None) is not None or getattr(trainer, "use_liger_kernel", False):
        raise ValueError("use_liger_kernel=True: Liger's fused GRPO loss copies beta when the trainer is built, "
                         "so a beta set by a controller would never be used; set use_liger_kernel=False "
                         "(or use TRL >= 1.16, whose loss reads trainer.beta with Liger on)")


class KLControllerCallback(TrainerCallback):
    """Feed the ``kl`` TRL logs to a klbelt controller; set ``trainer.beta`` for the next steps.

    On every ``on_log`` that has ``kl``: the beta in effect for the logged steps
    is added to the logs as ``beta`` (before later callbacks, e.g. the monitor,
    read them), then ``trainer.beta = controller.update(kl, n_steps)`` with
    ``n_steps`` the number of completions behind the logged mean
    (``logging_steps x per_device_train_batch_size x gradient_accumulation_steps x
    world_size``). Every process receives the same gathered ``kl``, so every
    process sets the same beta.

    Callbacks are not handed the trainer: use :func:`attach`, or pass
    ``trainer=`` here.

    Args:
        controller: a klbelt controller with ``unit="token-mean"``.
        trainer: the trainer whose ``beta`` to set (set by :func:`attach`).
    """

    def __init__(self, controller, trainer=None):
        _check_controller(controller)
        self.controller = controller
        self.trainer = None
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer) -> None:
        """Check ``trainer`` (has a usable ``beta``; no Liger) and drive its beta from now on."""
        _check_trainer(trainer)
        self.trainer = trainer
        trainer.beta = float(self.controller.kl_coef)

    def _need_trainer(self):
        if self.trainer is None:
            raise RuntimeError("KLControllerCallback has no trainer: use klbelt.integrations.trl.attach(trainer, "
                               "controller=...) or KLControllerCallback(controller, trainer=trainer)")
        return self.trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._need_trainer()
        if state.global_step > 0:  # resumed: the controller continues from the checkpoint's state
            path = _checkpoint_dir(args, state) / STATE_FILE
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no KL controller state in the checkpoint being resumed "
                                        f"(step {state.global_step}); was it saved without "
                                        f"KLControllerCallback?") from None
            self.controller.load_state_dict(saved)
        trainer.beta = float(self.controller.kl_coef)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "kl" not in logs:  # eval logs carry "eval_kl"; the summary has no kl
            return
        trainer = self._need_trainer()
        logs["beta"] = float(trainer.beta)
        n = (args.logging_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
             * max(1, args.world_size))
        trainer.beta = float(self.controller.update(float(logs["kl"]), n_steps=int(n)))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            text = json.dumps(self.controller.state_dict(), indent=1)
            atomic_write(folder / STATE_FILE, "w", lambda f: f.write(text))


def _checkpoint_dir(args, state) -> Path:
    resume = getattr(args, "resume_from_checkpoint", None)
    if isinstance(resume, str) and Path(resume).is_dir() and Path(resume).name == f"checkpoint-{state.global_step}":
        return Path(resume)
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class ReferenceKL:
    """beta = 0: the KL of each generation batch to a reference, added to TRL's ``kl`` metric.

    Wraps ``trainer._generate_and_score_completions`` on this instance (see the module's
    docstring for why a callback cannot do it). ``ref_model``: a frozen reference model;
    ``None``: the policy with its PEFT adapters disabled.
    """

    def __init__(self, trainer, ref_model=None):
        model = _unwrapped(trainer)
        if ref_model is None and not hasattr(model, "disable_adapter"):
            raise ValueError("monitor_only=True with beta 0 needs a reference to score: pass ref_model= (e.g. "
                             "AutoModelForCausalLM.from_pretrained(<the starting model>)), or train a PEFT adapter "
                             "(the reference is then the model with its adapters off)")
        if not hasattr(trainer, "_generate_and_score_completions") or not hasattr(trainer, "_metrics"):
            raise TypeError(f"monitor_only=True needs TRL's GRPOTrainer (_generate_and_score_completions, _metrics), "
                            f"got {type(trainer).__name__}")
        self.trainer, self.ref_model = trainer, ref_model
        if ref_model is not None:
            device = next(model.parameters()).device
            self.ref_model = ref_model.to(device).eval().requires_grad_(False)
            try:  # TRL >= 1.16 scores every model through its fused LM head, patched in as it does for its own ref_model
                from trl.trainer.utils import add_fused_lm_head
            except ImportError:
                add_fused_lm_head = None
            if add_fused_lm_head is not None:
                add_fused_lm_head(self.ref_model, temperature=trainer.temperature,
                                  cast_lm_head_to_fp32=getattr(trainer.args, "cast_lm_head_to_fp32", False))
        generate = trainer._generate_and_score_completions

        def generate_and_score_with_reference_kl(inputs):
            out = generate(inputs)
            self.log_kl(out)
            return out

        trainer._generate_and_score_completions = generate_and_score_with_reference_kl

    def _logps(self, model, ids, mask, n):
        return self.trainer._get_per_token_logps_and_entropies(model, ids, mask, n)[0]

    def log_kl(self, out: dict) -> float:
        """Append this batch's mean k3 (nats/token, over every process's completion tokens) to TRL's ``kl``."""
        import time

        import torch

        if any(k in out for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask")):
            raise ValueError("monitor_only=True scores text-only batches; this GRPO batch has image inputs")
        started = time.perf_counter()
        trainer = self.trainer
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        n = out["completion_ids"].size(1)
        with torch.no_grad():
            logps = out.get("old_per_token_logps")
            if logps is None:
                logps = self._logps(trainer.model, ids, mask, n)
            if self.ref_model is not None:
                ref = self._logps(self.ref_model, ids, mask, n)
            else:
                with _unwrapped(trainer).disable_adapter():
                    ref = self._logps(trainer.model, ids, mask, n)
        delta = ref - logps
        k3 = torch.exp(delta) - delta - 1
        cmask = out["completion_mask"].float()
        totals = trainer.accelerator.reduce(torch.stack([(k3 * cmask).sum(), cmask.sum()]), reduction="sum")
        kl = float(totals[0] / totals[1].clamp(min=1.0))
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode]["kl"].append(kl)
        trainer._metrics[mode]["klbelt/ref_seconds"].append(time.perf_counter() - started)
        return kl


def _unwrapped(trainer):
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model


def attach(trainer, controller=None, monitor=True, monitor_only=False, ref_model=None, **monitor_kwargs):
    """Add klbelt to a TRL trainer in one call; returns the callbacks added.

    Args:
        trainer: a TRL ``GRPOTrainer`` (anything with ``beta``, ``add_callback``).
        controller: a klbelt controller (``unit="token-mean"``) to drive
            ``trainer.beta``; ``None``: leave beta alone.
        monitor: ``True`` for a new :class:`KLMonitorCallback` (JSONL and
            report under ``<output_dir>/klbelt``), a ``KLMonitorCallback`` to
            use, or ``False`` for none.
        monitor_only: watch the KL, never drive beta (no ``controller``). At beta 0
            the reference is scored by klbelt (:class:`ReferenceKL`), so TRL logs ``kl``.
        ref_model: the reference for ``monitor_only`` at beta 0 (``None``: PEFT adapters off).
        **monitor_kwargs: passed to the new ``KLMonitorCallback``.

    Returns:
        ``(controller_callback or None, monitor_callback or None)``. The
        controller callback runs first, so the monitor sees the ``beta`` it logs.
    """
    if not hasattr(trainer, "add_callback"):
        raise TypeError(f"trainer must be a transformers/TRL Trainer (add_callback), got {type(trainer).__name__}")
    if monitor_only:
        if controller is not None:
            raise ValueError("monitor_only=True watches the KL without driving beta: pass controller=None")
        if monitor in (False, None):
            raise ValueError("monitor_only=True needs a monitor: pass monitor=True or a KLMonitorCallback")
        if getattr(trainer, "beta", None) == 0:
            ReferenceKL(trainer, ref_model)
    elif ref_model is not None:
        raise ValueError("ref_model is only read with monitor_only=True (TRL scores its own reference when beta > 0)")
    beta_cb = None
    if controller is not None:
        beta_cb = KLControllerCallback(controller, trainer=trainer)
        trainer.add_callback(beta_cb)
    mon_cb = None
    if monitor is True:
        mon_cb = KLMonitorCallback(**monitor_kwargs)
    elif isinstance(monitor, KLMonitorCallback):
        mon_cb = monitor
    elif monitor not in (False, None):
        raise TypeError(f"monitor must be True, False or a KLMonitorCallback, got {type(monitor).__name__}")
    if mon_cb is not None:
        trainer.add_callback(mon_cb)
    return beta_cb, mon_cb
