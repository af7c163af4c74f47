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

verl's ``algorithm.kl_penalty`` / ``actor.kl_loss_type`` names (``kl``, ``abs``,
``mse``, ``low_var_kl``, ``k1``..``k3`` and their ``+`` straight-through forms)
are accepted by :func:`klbelt.kl_per_token` directly; :data:`KL_PENALTY_NAMES`
maps them to klbelt's estimators. One difference: verl clamps ``low_var_kl`` to
[-10, 10] (and its log-ratio to [-20, 20]); klbelt's k3 is not clamped unless
``log_ratio_clamp`` is given.

This module imports nothing from verl: it works where verl is not installed.
"""

from __future__ import annotations

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

    ``state_dict()`` / ``load_state_dict()`` pass through to the controller
    (verl 0.9.1 does not checkpoint its controller; save these with your checkpoint).
    """

    def __init__(self, controller):
        check_controller(controller, VERL_KL_UNIT,
                         f"verl's apply_kl_penalty feeds current_kl in {VERL_KL_UNIT!r} (mean over sequences of "
                         "each sequence's token-mean KL, nats/token)")
        self.controller = controller

    @property
    def value(self) -> float:
        """beta, as verl reads it (``kl_ctrl.value``)."""
        return self.controller.kl_coef

    def update(self, current_kl, n_steps) -> None:
        """verl's call: one observation (nats/token) behind ``n_steps`` samples (the batch size)."""
        self.controller.update(current_kl, n_steps=int(n_steps))

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)

    def __repr__(self) -> str:
        return f"VerlKLController({self.controller!r})"
