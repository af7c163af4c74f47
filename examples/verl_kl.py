"""klbelt's KL estimators and controllers behind verl's interfaces.

    python examples/verl_kl.py

verl (checked against verl 0.9.1) computes KL in ``verl.trainer.ppo.core_algos``:
``kl_penalty(logprob, ref_logprob, kl_penalty=name)`` and two controllers with
``.value`` (beta) and ``.update(current_kl, n_steps)``, called once per batch by
``apply_kl_penalty`` in ``verl/trainer/ppo/ray_trainer.py``. This script shows
  (a) klbelt's ``kl_per_token`` gives verl's numbers, name for name;
  (b) ``VerlKLController``: any klbelt controller behind verl's interface.
``import verl`` needs ray (its package __init__ imports it); where verl cannot be
imported, the comparison runs against a transcription of verl 0.9.1's formulas.
"""

import numpy as np
import torch

import klbelt

try:
    from verl.trainer.ppo.core_algos import AdaptiveKLController as VerlAdaptive
    from verl.trainer.ppo.core_algos import kl_penalty as verl_kl_penalty

    SOURCE = "verl"
except ImportError as err:  # verl not installed, or installed without ray / tensordict / omegaconf
    SOURCE = f"verl 0.9.1 formulas transcribed (import failed: {err})"

    def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
        """verl 0.9.1 core_algos.kl_penalty_forward, for the names used below."""
        if kl_penalty in ("kl", "k1"):
            return logprob - ref_logprob
        if kl_penalty in ("mse", "k2"):
            return 0.5 * (logprob - ref_logprob).square()
        if kl_penalty in ("low_var_kl", "k3"):
            kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
            return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
        if kl_penalty == "abs":
            return (logprob - ref_logprob).abs()
        raise NotImplementedError(kl_penalty)

    class VerlAdaptive:
        """verl 0.9.1 core_algos.AdaptiveKLController (Ziegler et al. 2019)."""

        def __init__(self, init_kl_coef, target_kl, horizon):
            self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

        def update(self, current_kl, n_steps):
            self.value *= 1 + np.clip(current_kl / self.target - 1, -0.2, 0.2) * n_steps / self.horizon


# verl's name -> klbelt's estimator (verl's "k3+" etc. add a k2 straight-through gradient)
NAMES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3", "abs": "abs"}


class VerlKLController:
    """A klbelt controller with verl's controller interface (``.value``, ``.update``).

    verl feeds ``current_kl`` = mean over sequences of each sequence's token-mean
    KL (nats per token, sequences weighted equally) and ``n_steps`` = batch size.
    Pass it where verl builds its controller (``get_kl_controller`` /
    ``trainer.kl_ctrl_in_reward``), e.g.
    ``VerlKLController(klbelt.PIDKLController(0.001, target_kl=0.05))``.
    """

    def __init__(self, controller):
        self.controller = controller

    @property
    def value(self) -> float:
        return self.controller.kl_coef

    def update(self, current_kl, n_steps):
        self.controller.update(float(current_kl), n_steps=int(n_steps))

    # verl checkpoints nothing of its controller; these let a fork save beta with the model
    def state_dict(self):
        return self.controller.state_dict()

    def load_state_dict(self, state):
        self.controller.load_state_dict(state)


def main():
    print(f"comparing against: {SOURCE}")
    # |log-ratio| <= 1.5 keeps low_var_kl under verl's clamp at 10 (see below)
    gen = torch.Generator().manual_seed(0)
    logprob = -torch.rand(8, 16, generator=gen, dtype=torch.float64) * 1.5
    ref_logprob = -torch.rand(8, 16, generator=gen, dtype=torch.float64) * 1.5
    for verl_name, estimator in NAMES.items():
        ours = klbelt.kl_per_token(logprob, ref_logprob, estimator)
        torch.testing.assert_close(ours, verl_kl_penalty(logprob, ref_logprob, kl_penalty=verl_name))
    print(f"kl_per_token == verl kl_penalty for {', '.join(f'{v}={k}' for v, k in NAMES.items())}")

    # verl clamps low_var_kl to [-10, 10] (and the log-ratio to [-20, 20]); klbelt does
    # not clamp: a token whose ref log-prob is 15 nats above the policy's shows it
    far_lp, far_ref = torch.tensor([-16.0]), torch.tensor([-1.0])
    print(f"far-off-policy token: verl low_var_kl {float(verl_kl_penalty(far_lp, far_ref, 'low_var_kl')):.1f}, "
          f"klbelt k3 {float(klbelt.kl_per_token(far_lp, far_ref, 'k3')):.4g}")

    # (b) the proportional rule is verl's AdaptiveKLController: same beta trajectory
    verl_ctrl = VerlAdaptive(init_kl_coef=0.1, target_kl=0.02, horizon=10000)
    ours = VerlKLController(klbelt.AdaptiveKLController(0.1, 0.02, horizon=10000, rule="proportional"))
    mask = torch.ones_like(logprob, dtype=torch.bool)
    for step in range(20):
        kld = verl_kl_penalty(logprob * (1 + step / 10), ref_logprob, "kl")
        # what apply_kl_penalty feeds: per-sequence token-mean, then mean over sequences
        current_kl = float(klbelt.aggregate(kld, mask, "seq-mean-token-mean"))
        for ctrl in (verl_ctrl, ours):
            ctrl.update(current_kl=current_kl, n_steps=logprob.shape[0])
        assert abs(verl_ctrl.value - ours.value) <= 1e-12 * verl_ctrl.value
    print(f"VerlKLController(proportional) == verl AdaptiveKLController over 20 updates: beta {ours.value:.6f}")

    pid = VerlKLController(klbelt.PIDKLController(0.1, target_kl=0.02))
    pid.update(current_kl=0.05, n_steps=8)
    print(f"VerlKLController(PID) after one update at kl 0.05: beta {pid.value:.4f}")


if __name__ == "__main__":
    main()
