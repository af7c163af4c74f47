"""klbelt inside verl: a klbelt controller as verl's KL controller; verl's estimator names.

verl (checked on verl 0.9.1) keeps its in-reward KL controller behind two members:
``value`` (beta) and ``update(current_kl, n_steps)``, called once per batch by
``verl.trainer.ppo.ray_trainer.apply_kl_penalty`` with

    current_kl = mean over sequences of (masked mean over the sequence's tokens of kl_penalty(...))

(nats per token, every sequence weighted equally: klbelt's ``seq-mean-token-mean``)
and ``n_steps`` = the batch size. So a klbelt controller for verl is in
``unit="token-mean"``. Use it where verl builds its controller::

    from klbelt.integrations.verl import VerlKLController
    trainer.kl_ctrl_in_reward = VerlKLController(klbelt.PIDKLController(0.001, target_kl=0.05))

verl's other KL, in the actor's loss (``actor.use_kl_loss``: ``kl_loss_coef * agg_loss(kl_penalty(...))``),
is driven the same way with ``kl_in="loss"``: the controller observes the step's
``actor/kl_loss`` (nats/token under the default ``loss_agg_mode`` token-mean) and hands
verl a loss function whose ``ActorConfig`` carries the new coefficient (the config is
frozen, so a copy; verl's workers take it through ``set_loss_fn``)::

    ctrl = VerlKLController(klbelt.PIDKLController(0.001, target_kl=0.05), kl_in="loss")
    # after each step, with the step's metrics:
    ctrl.observe(metrics, n_steps=batch_size)
    trainer.actor_rollout_wg.set_loss_fn(ctrl.loss_fn(actor_config))

verl's ``algorithm.kl_penalty`` / ``actor.kl_loss_type`` names (``kl``, ``abs``,
``mse``, ``low_var_kl``, ``k1``..``k3`` and their ``+`` straight-through forms)
are accepted by :func:`klbelt.kl_per_token` directly; :data:`KL_PENALTY_NAMES`
maps them to klbelt's estimators. One difference: verl clamps ``low_var_kl`` to
[-10, 10] (and its log-ratio to [-20, 20]); klbelt's k3 is not clamped unless
``log_ratio_clamp`` is given.

This module imports nothing from verl: it works where verl is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ..kl.estimators import ESTIMATOR_ALIASES, ESTIMATORS
from ._checks import check_controller

__all__ = ["VerlKLController", "KL_PENALTY_NAMES", "VERL_KL_UNIT"]

#: the unit of the ``current_kl`` verl's apply_kl_penalty feeds its controller
VERL_KL_UNIT = "token-mean"

#: verl's kl_penalty name -> klbelt's estimator ("+": the estimator's value, k2's gradient)
KL_PENALTY_NAMES = {
    name + plus: ESTIMATOR_ALIASES.get(name, name) + plus
    for plus in ("", "+")
    for name in ESTIMATORS + tuple(ESTIMATOR_ALIASES)
}


class VerlKLController:
    """A klbelt controller behind verl's controller interface (``value``, ``update(current_kl, n_steps)``).

    Args:
        controller: a klbelt controller (``FixedKLController``, ``AdaptiveKLController``,
            ``PIDKLController``) with ``unit="token-mean"``, the unit verl feeds.
        kl_in: ``"reward"`` (verl's ``kl_ctrl_in_reward``, beta of ``algorithm.kl_penalty``) or
            ``"loss"`` (the actor's ``kl_loss_coef``: see :meth:`observe` and :meth:`loss_fn`).

    ``state_dict()`` / ``load_state_dict()`` pass through to the controller
    (verl 0.9.1 does not checkpoint its controller; save these with your checkpoint).
    """

    def __init__(self, controller, *, kl_in: str = "reward"):
        if kl_in not in ("reward", "loss"):
            raise ValueError(f"kl_in must be 'reward' (algorithm.kl_ctrl) or 'loss' (actor.kl_loss_coef), got {kl_in!r}")
        check_controller(controller, VERL_KL_UNIT,
                         f"verl's apply_kl_penalty feeds current_kl in {VERL_KL_UNIT!r} (mean over sequences of "
                         "each sequence's token-mean KL, nats/token)" if kl_in == "reward" else
                         f"verl's actor/kl_loss is in {VERL_KL_UNIT!r} (nats/token) under loss_agg_mode token-mean "
                         "or seq-mean-token-mean")
        self.controller, self.kl_in = controller, kl_in

    @property
    def value(self) -> float:
        """beta, as verl reads it (``kl_ctrl.value``)."""
        return self.controller.kl_coef

    def update(self, current_kl, n_steps) -> None:
        """verl's call: one observation (nats/token) behind ``n_steps`` samples (the batch size)."""
        self.controller.update(current_kl, n_steps=int(n_steps))

    def observe(self, metrics, n_steps) -> float:
        """``kl_in="loss"``: update beta from a step's metrics (verl's ``actor/kl_loss``, nats/token); returns it."""
        key = next((k for k in ("actor/kl_loss", "kl_loss") if k in metrics), None)
        if key is None:
            raise ValueError("metrics must hold verl's 'actor/kl_loss' (set actor.use_kl_loss=True); got keys "
                             f"{', '.join(sorted(map(str, metrics))) or 'none'}")
        value = metrics[key]
        value = float(value.aggregate() if hasattr(value, "aggregate") else value)  # a verl Metric or a number
        if not math.isfinite(value):
            raise ValueError(f"metrics[{key!r}] must be a finite KL, got {value}")
        self.update(value, n_steps)
        return self.value

    def actor_config(self, actor_config):
        """A copy of verl's (frozen) ``ActorConfig`` with ``kl_loss_coef`` = the current beta."""
        if self.kl_in != "loss":
            raise ValueError("actor_config/loss_fn drive actor.kl_loss_coef: build the controller with kl_in='loss'")
        if not getattr(actor_config, "use_kl_loss", False):
            raise ValueError("actor_config.use_kl_loss is False: verl adds no KL to the loss for kl_loss_coef to scale")
        mode = getattr(actor_config, "loss_agg_mode", "token-mean")
        if mode not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"actor_config.loss_agg_mode {mode!r} does not give actor/kl_loss in nats/token; use "
                             "'token-mean' or 'seq-mean-token-mean'")
        return dataclasses.replace(actor_config, kl_loss_coef=float(self.value))

    def loss_fn(self, actor_config):
        """verl's own ``ppo_loss`` bound to :meth:`actor_config` (for ``actor_rollout_wg.set_loss_fn``)."""
        from verl.workers.utils.losses import ppo_loss

        return functools.partial(ppo_loss, config=self.actor_config(actor_config))

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)

    def __repr__(self) -> str:
        return f"VerlKLController({self.controller!r})"
