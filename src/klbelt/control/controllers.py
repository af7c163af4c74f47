"""KL controllers: the rule that sets beta (``kl_coef``) from the observed KL.

Every controller has the same surface:

* ``kl_coef``: the current beta (a Python float);
* ``update(observed_kl, n_steps=1) -> float``: feed one observation, get the
  new beta. ``observed_kl`` is a float or a one-element tensor, in the unit
  named by ``unit``; it may be negative (a k1 estimate of a small KL is);
* ``unit``: ``"token-mean"`` (nats per token, e.g. ``aggregate(kl, mask,
  "token-mean")``) or ``"seq-sum"`` (nats per response, e.g.
  ``aggregate(kl, mask, "seq-mean-token-sum")``). It says what ``observed_kl``
  and ``target_kl`` mean; the controller cannot check it, so a target is only
  portable between runs that feed the same unit;
* ``state_dict()`` / ``load_state_dict(state)``: a JSON-serialisable dict
  holding the configuration and the state, so a run resumed from a checkpoint
  continues the beta trajectory exactly.

Updates are deterministic functions of the observations, so ranks that feed
the same global observation (see :func:`klbelt.control.global_observed_kl`)
hold the same beta.
"""

from __future__ import annotations

import math

import torch

from ..kl import _checks

UNITS = ("token-mean", "seq-sum")
RULES = ("step", "proportional")


def _number(name: str, value, **kw) -> float:
    """A finite real number from a float or a one-element tensor, as a Python float.

    A tensor is read once (one host sync per controller update): beta drives
    Python-side branches and is checkpointed as JSON, so it lives on the host.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a one-element tensor, got tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = float(value.detach().reshape(()))
    return _checks.scalar(name, value, **kw)


def _n_steps(n_steps) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise TypeError(f"n_steps must be a positive int (samples or steps behind this observation), "
                        f"got {type(n_steps).__name__}")
    if n_steps <= 0:
        raise ValueError(f"n_steps must be a positive int, got {n_steps}")
    return n_steps


def _bound(name: str, value, default: float) -> float:
    if value is None:
        return default
    if value == math.inf or value == "inf":  # "inf": how state_dict stores an unbounded maximum (JSON has no inf)
        return math.inf
    return _number(name, value, nonnegative=True)


def _json_bound(value: float):
    return "inf" if value == math.inf else value


def _observed(observed_kl, current_kl):
    """``update(observed_kl)`` or, as TRL and verl call it, ``update(current_kl=...)``: exactly one."""
    if current_kl is None:
        if observed_kl is None:
            raise TypeError("update() needs the observed KL: update(observed_kl, n_steps) or update(current_kl=..., n_steps=...)")
        return observed_kl
    if observed_kl is not None:
        raise TypeError("update(): give observed_kl or current_kl (its alias), not both")
    return current_kl


class _Controller:
    """Shared plumbing: validation of the unit and the checkpoint format.

    A subclass lists in ``_state`` the attributes that change during a run;
    ``_config()`` returns its constructor keyword arguments.
    """

    _state: tuple[str, ...] = ("kl_coef", "n_updates")

    def _config(self) -> dict:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Configuration and state as plain JSON types (floats, ints, strings, lists, None)."""
        state = {"type": type(self).__name__, "config": self._config()}
        state.update({k: getattr(self, k) for k in self._state})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (configuration included), validating it."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is for {state.get('type')!r}, cannot load it into {type(self).__name__}")
        missing = [k for k in ("config",) + self._state if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}")
        fresh = type(self)(**state["config"])  # validates the configuration
        self.__dict__.update(fresh.__dict__)
        for key in self._state:
            setattr(self, key, self._check_state(key, state[key]))

    def _check_state(self, key: str, value):
        if key == "n_updates":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state n_updates must be an int >= 0, got {value!r}")
            return value
        if value is None:
            raise ValueError(f"state {key} must be a number, got None")
        return _number(f"state {key}", value, nonnegative=key in ("kl_coef", "integral"))

    @property
    def value(self) -> float:
        """The current beta: an alias of ``kl_coef`` (TRL's and verl's controllers call it ``value``)."""
        return self.kl_coef

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args}) with kl_coef={self.kl_coef:.6g}"


class FixedKLController(_Controller):
    """A constant beta. ``update`` checks its input and returns ``kl_coef`` unchanged.

    Args:
        kl_coef: beta >= 0.
        unit: ``"token-mean"`` or ``"seq-sum"``: what the observations fed to
            ``update`` are (kept for logs; a fixed beta ignores them).
    """

    def __init__(self, kl_coef: float = 0.1, *, unit: str = "token-mean"):
        self.kl_coef = _number("kl_coef", kl_coef, nonnegative=True)
        self.unit = _checks.choice("unit", unit, UNITS)
        self.n_updates = 0

    def _config(self) -> dict:
        return {"kl_coef": self.kl_coef, "unit": self.unit}

    def update(self, observed_kl=None, n_steps: int = 1, *, current_kl=None) -> float:
        _number("observed_kl", _observed(observed_kl, current_kl))
        _n_steps(n_steps)
        self.n_updates += 1
        return self.kl_coef


class AdaptiveKLController(_Controller):
    r"""Multiplicative beta control towards ``target_kl``.

    ``rule="step"`` (the article's): with :math:`K` the observed KL and
    :math:`K^*` the target,

    .. math::
        \beta \leftarrow \beta \cdot f \text{ if } K > h K^*, \quad
        \beta \leftarrow \beta / f \text{ if } K < l K^*, \quad
        \text{then } \beta \leftarrow \mathrm{clip}(\beta, \beta_{min}, \beta_{max})

    with :math:`f` = ``step_factor`` = 1.5, :math:`(l, h)` = ``step_band`` =
    (0.5, 1.5), and default bounds [0.01, 1.0]. ``n_steps`` and ``horizon``
    are not used (the article keeps ``horizon`` but never reads it). Inside
    the band beta does not move, so this rule holds KL anywhere within
    [0.5, 1.5] x target, not at the target.

    ``rule="proportional"`` (Ziegler et al. 2019, "Fine-tuning language models
    from human preferences"):

    .. math::
        e = \mathrm{clip}(K / K^* - 1, -c, c), \qquad
        \beta \leftarrow \beta \, (1 + e \cdot n / H)

    with :math:`c` = ``error_clip`` = 0.2, :math:`n` = ``n_steps`` (the number
    of samples behind the observation, e.g. the batch size) and :math:`H` =
    ``horizon``. No bounds by default (``min_kl_coef=0``, ``max_kl_coef=inf``).

    Args:
        init_kl_coef: initial beta > 0 (a multiplicative rule never leaves 0),
            within the bounds.
        target_kl: target KL > 0, in ``unit``.
        horizon: H > 0 (samples; the proportional rule's time constant).
        rule: ``"step"`` or ``"proportional"``.
        unit: ``"token-mean"`` or ``"seq-sum"``: the unit of ``target_kl`` and
            of every ``observed_kl``.
        min_kl_coef, max_kl_coef: bounds on beta; ``None`` takes the rule's
            default ([0.01, 1.0] for step, [0, inf) for proportional).
        step_factor: f > 1 for the step rule.
        step_band: (l, h) with 0 <= l <= 1 <= h for the step rule.
        error_clip: c > 0 for the proportional rule.
    """

    def __init__(
        self,
        init_kl_coef: float = 0.1,
        target_kl: float = 0.02,
        horizon: float = 10000,
        rule: str = "step",
        *,
        unit: str = "token-mean",
        min_kl_coef: float | None = None,
        max_kl_coef: float | None = None,
        step_factor: float = 1.5,
        step_band=(0.5, 1.5),
        error_clip: float = 0.2,
    ):
        self.rule = _checks.choice("rule", rule, RULES)
        self.unit = _checks.choice("unit", unit, UNITS)
        self.target_kl = _number("target_kl", target_kl, positive=True)
        self.horizon = _number("horizon", horizon, positive=True)
        default_min, default_max = (0.01, 1.0) if rule == "step" else (0.0, math.inf)
        self.min_kl_coef = _bound("min_kl_coef", min_kl_coef, default_min)
        self.max_kl_coef = _bound("max_kl_coef", max_kl_coef, default_max)
        if self.min_kl_coef > self.max_kl_coef:
            raise ValueError(f"min_kl_coef ({self.min_kl_coef}) must be <= max_kl_coef ({self.max_kl_coef})")
        self.step_factor = _number("step_factor", step_factor, positive=True)
        if self.step_factor <= 1:
            raise ValueError(f"step_factor must be > 1, got {self.step_factor}")
        if not isinstance(step_band, (tuple, list)) or len(step_band) != 2:
            raise TypeError(f"step_band must be a pair (low, high), got {step_band!r}")
        low, high = (_number(f"step_band[{i}]", v, nonnegative=True) for i, v in enumerate(step_band))
        if not low <= 1 <= high:
            raise ValueError(f"step_band must satisfy low <= 1 <= high, got ({low}, {high})")
        self.step_band = [low, high]
        self.error_clip = _number("error_clip", error_clip, positive=True)
        init = _number("init_kl_coef", init_kl_coef, positive=True)
        if not self.min_kl_coef <= init <= self.max_kl_coef:
            raise ValueError(
                f"init_kl_coef must lie within [min_kl_coef, max_kl_coef] = [{self.min_kl_coef}, {self.max_kl_coef}], "
                f"got {init}"
            )
        self.init_kl_coef = init
        self.kl_coef = init
        self.n_updates = 0

    def _config(self) -> dict:
        return {
            "init_kl_coef": self.init_kl_coef,
            "target_kl": self.target_kl,
            "horizon": self.horizon,
            "rule": self.rule,
            "unit": self.unit,
            "min_kl_coef": self.min_kl_coef,
            "max_kl_coef": _json_bound(self.max_kl_coef),
            "step_factor": self.step_factor,
            "step_band": list(self.step_band),
            "error_clip": self.error_clip,
        }

    def update(self, observed_kl=None, n_steps: int = 1, *, current_kl=None) -> float:
        """Feed the observed KL (in ``unit``) behind ``n_steps`` samples; return the new beta."""
        kl = _number("observed_kl", _observed(observed_kl, current_kl))
        n_steps = _n_steps(n_steps)
        beta = self.kl_coef
        if self.rule == "step":
            if kl > self.step_band[1] * self.target_kl:
                beta *= self.step_factor
            elif kl < self.step_band[0] * self.target_kl:
                beta /= self.step_factor
        else:
            gain = n_steps / self.horizon
            if self.error_clip * gain >= 1:
                raise ValueError(
                    f"n_steps / horizon = {gain:.4g} is too large for the proportional rule: with error_clip="
                    f"{self.error_clip} beta could be multiplied by a factor <= 0; use a horizon > "
                    f"{self.error_clip * n_steps:g}"
                )
            error = min(max(kl / self.target_kl - 1.0, -self.error_clip), self.error_clip)
            beta *= 1.0 + error * gain
        self.kl_coef = min(max(beta, self.min_kl_coef), self.max_kl_coef)
        self.n_updates += 1
        return self.kl_coef


class PIDKLController(_Controller):
    r"""Beta as a PID-controlled Lagrange multiplier for the constraint KL <= target.

    Stooke, Achiam & Abbeel 2020 ("Responsive safety in reinforcement learning
    by PID Lagrangian methods"), with the error measured relative to the
    target so that gains do not depend on the KL's unit or scale:

    .. math::
        e_k = K_k / K^* - 1, \qquad
        I_k = \mathrm{clip}(I_{k-1} + k_I\, e_k,\ \beta_{min},\ \beta_{max}), \qquad
        D_k = \max(0,\ \bar K_k - \bar K_{k-1}) / K^*,

        \beta_k = \mathrm{clip}(k_P\, \bar e_k + I_k + k_D\, D_k,\ \beta_{min},\ \beta_{max})

    where :math:`\bar K` is an exponential moving average of the observed KL
    (weight ``smoothing`` on the past; 0 = no smoothing) used by the P and D
    terms, :math:`\bar e_k = \bar K_k / K^* - 1`, and :math:`I_0` =
    ``init_kl_coef``. Clipping the integral to :math:`[\beta_{min}, \beta_{max}]` is
    the anti-windup: the multiplier never stores debt it cannot pay out. As
    in the paper the derivative acts only on increases of the KL.
    With ``kp = kd = 0`` this is projected dual ascent on the Lagrangian
    :math:`E[r] - \beta\,(KL/K^* - 1)` with step size ``ki``:
    :math:`\beta \leftarrow \max(0, \beta + k_I (K/K^* - 1))`.

    Each ``update`` call is one control iteration: ``n_steps`` is validated
    and otherwise ignored, so gains are "per update", whatever the batch size.

    Start-up (``warmup``). An RLHF trainer measures the KL of rollouts drawn
    *before* each update, so the first observation is exactly 0 and the next
    few are small while the policy leaves the reference: relative error -1,
    which would send beta to 0 at once and let the KL overshoot (measured on
    the English demo: beta 0 for four updates, then KL 3.7x the target and
    beta wound up to 0.7). For the first ``warmup`` updates the integral only
    takes positive errors (conditional integration), beta stays at least
    ``init_kl_coef``, and the P/D average is the last observation itself
    (no EMA memory of the start's zeros).

    ``min_kl_coef`` is a floor on beta and on the integral: a noisy run of
    low KL estimates cannot drive beta to 0, where the policy runs free.

    Args:
        init_kl_coef: initial beta >= 0 (the integral's starting value).
        target_kl: target KL > 0, in ``unit``.
        kp, ki, kd: gains >= 0 (beta per unit of relative error).
        unit: ``"token-mean"`` or ``"seq-sum"``.
        max_kl_coef: upper bound on beta (``None``: unbounded).
        smoothing: EMA weight in [0, 1) for the P and D terms.
        min_kl_coef: lower bound on beta and on the integral (default 0).
        warmup: updates at the start during which beta does not fall below
            ``init_kl_coef`` (default 0: off).
    """

    _state = ("kl_coef", "n_updates", "integral", "smoothed_kl")

    def __init__(
        self,
        init_kl_coef: float = 0.1,
        target_kl: float = 0.02,
        *,
        kp: float = 0.05,
        ki: float = 0.02,
        kd: float = 1.0,
        unit: str = "token-mean",
        max_kl_coef: float | None = None,
        smoothing: float = 0.8,
        min_kl_coef: float = 0.0,
        warmup: int = 0,
    ):
        self.unit = _checks.choice("unit", unit, UNITS)
        self.target_kl = _number("target_kl", target_kl, positive=True)
        self.kp = _number("kp", kp, nonnegative=True)
        self.ki = _number("ki", ki, nonnegative=True)
        self.kd = _number("kd", kd, nonnegative=True)
        self.max_kl_coef = _bound("max_kl_coef", max_kl_coef, math.inf)
        self.min_kl_coef = _bound("min_kl_coef", min_kl_coef, 0.0)
        if self.min_kl_coef > self.max_kl_coef:
            raise ValueError(f"min_kl_coef ({self.min_kl_coef}) must be <= max_kl_coef ({self.max_kl_coef})")
        self.smoothing = _number("smoothing", smoothing, nonnegative=True)
        if self.smoothing >= 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (updates), got {warmup!r}")
        self.warmup = warmup
        init = _number("init_kl_coef", init_kl_coef, nonnegative=True)
        if init > self.max_kl_coef:
            raise ValueError(f"init_kl_coef must be <= max_kl_coef ({self.max_kl_coef}), got {init}")
        if init < self.min_kl_coef:
            raise ValueError(f"init_kl_coef must be >= min_kl_coef ({self.min_kl_coef}), got {init}")
        self.init_kl_coef = init
        self.kl_coef = init
        self.integral = init
        self.smoothed_kl = None  # no observation yet
        self.n_updates = 0

    def _config(self) -> dict:
        return {
            "init_kl_coef": self.init_kl_coef,
            "target_kl": self.target_kl,
            "kp": self.kp,
            "ki": self.ki,
            "kd": self.kd,
            "unit": self.unit,
            "max_kl_coef": _json_bound(self.max_kl_coef),
            "smoothing": self.smoothing,
            "min_kl_coef": self.min_kl_coef,
            "warmup": self.warmup,
        }

    def _check_state(self, key: str, value):
        if key == "smoothed_kl" and value is None:
            return None
        return super()._check_state(key, value)

    def update(self, observed_kl=None, n_steps: int = 1, *, current_kl=None) -> float:
        """Feed the observed KL (in ``unit``); return the new beta. ``n_steps`` is not used."""
        kl = _number("observed_kl", _observed(observed_kl, current_kl))
        _n_steps(n_steps)
        warming = self.n_updates < self.warmup
        previous = self.smoothed_kl
        if previous is None or warming:
            smoothed = kl
        else:
            smoothed = self.smoothing * previous + (1.0 - self.smoothing) * kl
        error = kl / self.target_kl - 1.0
        if warming:
            error = max(error, 0.0)
        self.integral = min(max(self.integral + self.ki * error, self.min_kl_coef), self.max_kl_coef)
        rise = 0.0 if previous is None else max(0.0, smoothed - previous) / self.target_kl
        beta = self.kp * (smoothed / self.target_kl - 1.0) + self.integral + self.kd * rise
        floor = max(self.min_kl_coef, self.init_kl_coef) if warming else self.min_kl_coef
        self.kl_coef = min(max(beta, floor), self.max_kl_coef)
        self.smoothed_kl = smoothed
        self.n_updates += 1
        return self.kl_coef
