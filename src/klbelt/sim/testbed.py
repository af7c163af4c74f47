r"""An exact testbed for KL-regularised policy optimisation, where the optimum is known.

The "policy" is a categorical distribution :math:`\pi_\theta = \mathrm{softmax}(\theta)`
over N responses, the reference :math:`\pi_{ref}` another one, and
:math:`r \in \mathbb{R}^N` the reward of each response. Each response is a
one-token sequence, so the per-token mean and the per-sequence sum of the KL
coincide (a controller of either unit reads the same numbers).

The maximiser of :math:`J(\pi) = E_\pi[r] - \beta\,KL(\pi \| \pi_{ref})` is the
Gibbs distribution

.. math::
    \pi^*(y) = \pi_{ref}(y)\, e^{r(y)/\beta} / Z, \qquad
    Z = \sum_y \pi_{ref}(y)\, e^{r(y)/\beta},

    KL(\pi^* \| \pi_{ref}) = E_{\pi^*}[r] / \beta - \log Z .

The KL at the optimum decreases from :math:`-\log \pi_{ref}(\arg\max r)`
(beta -> 0) to 0 (beta -> inf): it is bounded, unlike the article's
illustrative ``0.8 / beta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..control.controllers import FixedKLController, _number
from ..kl import _checks
from ..kl.estimators import ESTIMATOR_ALIASES, ESTIMATORS, kl_per_token
from ..shaping.shape import shape_rewards

GRADIENTS = ("exact", "sampled")
KL_PLACEMENTS = ("reward", "loss")
OPTIMIZERS = ("adam", "sgd")


def _as_vector(name: str, values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        _checks.tensor(name, values)
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
        x = values.detach().to("cpu", torch.float64)
    else:
        try:
            x = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of numbers or a 1-d tensor, got {values!r}") from None
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"{name} must be a 1-d vector of at least 2 entries (one per response), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_problem(ref_probs, reward) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a testbed problem; return (ref_probs, reward) as float64 CPU vectors.

    ``ref_probs`` must be strictly positive and sum to 1 (within 1e-6): a zero
    would make the response unreachable and the KL of any policy using it
    infinite. ``reward`` must have the same length.
    """
    ref = _as_vector("ref_probs", ref_probs)
    r = _as_vector("reward", reward)
    if (ref <= 0).any():
        raise ValueError(f"ref_probs must be > 0 everywhere (a reference that excludes a response), got {ref.tolist()}")
    if abs(float(ref.sum()) - 1.0) > 1e-6:
        raise ValueError(f"ref_probs must sum to 1, got sum {float(ref.sum()):.8g}")
    if r.shape != ref.shape:
        raise ValueError(f"reward must have one entry per response ({ref.numel()}), got {r.numel()}")
    return ref / ref.sum(), r


@dataclass
class Optimum:
    """The closed-form optimum for one beta. ``kl`` is in nats (per token = per response)."""

    kl_coef: float
    probs: list
    kl: float
    expected_reward: float
    log_partition: float

    @property
    def objective(self) -> float:
        """:math:`E_{\\pi^*}[r] - \\beta KL = \\beta \\log Z`."""
        return self.expected_reward - self.kl_coef * self.kl


def optimum(ref_probs, reward, kl_coef: float) -> Optimum:
    r"""The KL-regularised optimum :math:`\pi^* \propto \pi_{ref} e^{r/\beta}` in closed form.

    ``KL = E_{\pi^*}[r] / \beta - \log Z``, computed in float64 with a
    log-sum-exp so that small beta does not overflow.
    """
    ref, r = check_problem(ref_probs, reward)
    beta = _number("kl_coef", kl_coef, positive=True)
    log_unnorm = ref.log() + r / beta
    log_z = torch.logsumexp(log_unnorm, 0)
    probs = (log_unnorm - log_z).exp()
    expected = float((probs * r).sum())
    log_z_ref = float(log_z)  # log Z
    kl = expected / beta - log_z_ref
    return Optimum(kl_coef=beta, probs=probs.tolist(), kl=max(kl, 0.0), expected_reward=expected, log_partition=log_z_ref)


def max_kl(ref_probs, reward) -> float:
    """Supremum of the optimal KL over beta > 0: :math:`-\\log \\pi_{ref}(\\arg\\max r)` (the beta -> 0 limit)."""
    ref, r = check_problem(ref_probs, reward)
    return -math.log(float(ref[r == r.max()].sum()))


def kl_coef_for_target(ref_probs, reward, target_kl: float, *, rtol: float = 1e-10) -> float:
    """The beta whose optimum has KL = ``target_kl`` (bisection on log beta; the KL decreases in beta)."""
    target = _number("target_kl", target_kl, positive=True)
    ceiling = max_kl(ref_probs, reward)
    if target >= ceiling:
        raise ValueError(
            f"target_kl must be below {ceiling:.6g} = -log ref(argmax reward), the largest KL an optimum reaches; "
            f"got {target}"
        )
    lo, hi = -30.0, 30.0  # log beta
    while hi - lo > rtol:
        mid = 0.5 * (lo + hi)
        if optimum(ref_probs, reward, math.exp(mid)).kl > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def exact_kl(logits: torch.Tensor, ref_probs: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || ref) in nats, differentiable in ``logits``."""
    logp = torch.log_softmax(logits, -1)
    return (logp.exp() * (logp - ref_probs.log())).sum(-1)


@dataclass
class SimResult:
    """Trajectory of :func:`simulate`, one entry per controller update.

    ``kl``: exact KL(pi || ref) of the policy after the update's policy steps;
    ``observed_kl``: what the controller was fed (noisy under sampled gradients);
    ``kl_coef``: beta after the controller's update; ``reward``: exact E_pi[r].
    KL values are in nats per response (= per token here).
    """

    kl: list = field(default_factory=list)
    observed_kl: list = field(default_factory=list)
    kl_coef: list = field(default_factory=list)
    reward: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    init_kl_coef: float = 0.0


def simulate(
    ref_probs,
    reward,
    controller=0.1,
    *,
    steps: int = 200,
    inner_steps: int = 5,
    gradient: str = "exact",
    batch_size: int = 256,
    estimator: str = "k1",
    kl_in: str = "reward",
    optimizer: str = "adam",
    lr: float = 0.05,
    seed: int = 0,
    init_logits=None,
    observe_samples: int | None = None,
    observe_estimator: str | None = None,
) -> SimResult:
    r"""Optimise the categorical policy against ``reward`` with a KL penalty set by ``controller``.

    The loop mirrors an RLHF trainer: ``steps`` times, the policy takes
    ``inner_steps`` optimiser steps at the current beta, then the controller
    sees the KL of that phase and sets the next beta.

    * ``gradient="exact"``: the policy ascends the exact
      :math:`E_\pi[r] - \beta KL(\pi \| \pi_{ref})`; the observed KL is the
      exact KL, averaged over the phase's steps.
    * ``gradient="sampled"``: each step draws ``batch_size`` responses from
      the policy and takes a policy-gradient step. With ``kl_in="reward"`` the
      KL estimate (``estimator``, via :func:`klbelt.shape_rewards`) is in the
      reward: :math:`\hat g = \frac1B \sum_i (R_i - b_i) \nabla \log \pi(y_i)`
      with :math:`R_i = r(y_i) - \beta\,k(y_i)` and a leave-one-out baseline
      :math:`b_i`; with k1 this is unbiased for :math:`\nabla J`. With
      ``kl_in="loss"`` the reward is the raw score and
      :math:`\beta \cdot \mathrm{mean}(k(y_i))` is added to the loss
      (k2 gives :math:`\nabla J`; k3 gives the gradient of the *forward* KL,
      a different optimum). The observed KL is the phase's mean of
      ``estimator`` over its ``inner_steps * batch_size`` samples, and the
      controller is told ``n_steps = inner_steps * batch_size``.

    Args:
        ref_probs, reward: the problem (see :func:`check_problem`).
        controller: a controller (``update``/``kl_coef``) or a fixed beta >= 0.
        steps: controller updates (> 0). inner_steps: policy steps per update (> 0).
        batch_size: samples per policy step (sampled gradients; >= 2).
        optimizer: ``"adam"`` or ``"sgd"`` with learning rate ``lr``.
        seed: seed of the sampler (the run is deterministic given it).
        init_logits: starting logits (default: log ref_probs, i.e. KL = 0).
        observe_samples: sampled gradients only: feed the controller the
            ``estimator`` mean over this many fresh draws from the policy as it
            was *before* the update's first step (an RLHF trainer's order:
            roll out, measure, update; the first observation then sees KL 0),
            instead of the phase's gradient samples. ``None``: the phase's mean.
        observe_estimator: with ``observe_samples``, the estimator whose mean
            the controller is fed (default: ``estimator``).

    Returns:
        :class:`SimResult`.
    """
    ref, r = check_problem(ref_probs, reward)
    if not hasattr(controller, "update"):
        controller = FixedKLController(_number("controller (a fixed kl_coef)", controller, nonnegative=True))
    sizes = [("steps", steps, 1), ("inner_steps", inner_steps, 1), ("batch_size", batch_size, 2)]
    if observe_samples is not None:
        if gradient != "sampled":
            raise ValueError(f"observe_samples needs gradient='sampled' (exact gradients observe the exact KL), "
                             f"got gradient={gradient!r}")
        sizes.append(("observe_samples", observe_samples, 1))
    for name, value, low in sizes:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    _checks.choice("gradient", gradient, GRADIENTS)
    _checks.choice("estimator", estimator, ESTIMATORS + tuple(ESTIMATOR_ALIASES))
    estimator = ESTIMATOR_ALIASES.get(estimator, estimator)  # verl's names: kl, mse, low_var_kl
    observe_estimator = estimator if observe_estimator is None else observe_estimator
    _checks.choice("observe_estimator", observe_estimator, ESTIMATORS + tuple(ESTIMATOR_ALIASES))
    observe_estimator = ESTIMATOR_ALIASES.get(observe_estimator, observe_estimator)
    _checks.choice("kl_in", kl_in, KL_PLACEMENTS)
    _checks.choice("optimizer", optimizer, OPTIMIZERS)
    lr = _number("lr", lr, positive=True)
    if init_logits is None:
        logits = ref.log().clone()
    else:
        logits = _as_vector("init_logits", init_logits)
        if logits.shape != ref.shape:
            raise ValueError(f"init_logits must have one entry per response ({ref.numel()}), got {logits.numel()}")
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr) if optimizer == "adam" else torch.optim.SGD([logits], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(batch_size, 1, dtype=torch.float64)
    result = SimResult(init_kl_coef=float(controller.kl_coef))

    for _ in range(steps):
        beta = float(controller.kl_coef)
        phase_kl = 0.0
        if observe_samples is not None:
            with torch.no_grad():
                logp_all = torch.log_softmax(logits, -1)
                y = torch.multinomial(logp_all.exp(), observe_samples, replacement=True, generator=gen)
                measured = float(kl_per_token(logp_all[y], ref.log()[y], observe_estimator).mean())
        for _ in range(inner_steps):
            opt.zero_grad()
            if gradient == "exact":
                kl = exact_kl(logits, ref)
                logp = torch.log_softmax(logits, -1)
                loss = -((logp.exp() * r).sum() - beta * kl)
                phase_kl += float(kl.detach())
            else:
                logp_all = torch.log_softmax(logits, -1)
                y = torch.multinomial(logp_all.detach().exp(), batch_size, replacement=True, generator=gen)
                logp = logp_all[y]
                ref_logp = ref.log()[y]
                if kl_in == "reward":
                    shaped = shape_rewards(r[y], logp.detach()[:, None], ref_logp[:, None], ones, beta, estimator)
                    returns = shaped.rewards.sum(-1)
                    observed = shaped.kl_mean
                    kl_loss = 0.0
                else:
                    returns = r[y]
                    k = kl_per_token(logp, ref_logp, estimator)
                    observed = k.detach().mean()
                    kl_loss = beta * k.mean()
                baseline = (returns.sum() - returns) / (batch_size - 1)  # leave-one-out: keeps the gradient unbiased
                loss = -((returns - baseline) * logp).mean() + kl_loss
                phase_kl += float(observed)
            loss.backward()
            opt.step()
        observed_kl = phase_kl / inner_steps if observe_samples is None else measured
        n_samples = inner_steps * (batch_size if gradient == "sampled" else 1)
        if observe_samples is not None:
            n_samples = observe_samples
        new_beta = controller.update(observed_kl, n_steps=n_samples)
        with torch.no_grad():
            result.kl.append(float(exact_kl(logits, ref)))
            result.reward.append(float((torch.softmax(logits, -1) * r).sum()))
        result.observed_kl.append(observed_kl)
        result.kl_coef.append(float(new_beta))
    result.probs = torch.softmax(logits.detach(), -1).tolist()
    return result
