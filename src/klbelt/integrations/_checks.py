"""The check every framework adapter makes of the klbelt controller it is handed."""

from __future__ import annotations


def check_controller(controller, unit: str, logged: str) -> None:
    """Refuse anything that is not a klbelt KL controller in ``unit``.

    ``logged`` says what the framework feeds the controller and in which unit
    (one clause, for the error message), e.g. "TRL's GRPOTrainer logs kl in
    'token-mean' (mean of k3 over completion tokens, nats/token)".
    """
    for attr in ("kl_coef", "update", "state_dict", "load_state_dict"):
        if not hasattr(controller, attr):
            raise TypeError(f"controller must be a klbelt KL controller (kl_coef, update, state_dict, "
                            f"load_state_dict), got {type(controller).__name__} without {attr!r}")
    got = getattr(controller, "unit", None)
    if got != unit:
        raise ValueError(f"controller.unit is {got!r} but {logged}; build the controller with unit={unit!r}")
