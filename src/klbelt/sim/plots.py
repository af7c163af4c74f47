"""The article's two beta plots, made real in the testbed. Needs matplotlib (``klbelt[plot]``)."""

from __future__ import annotations

import os

import numpy as np

from .._files import atomic_write
from .compare import DEFAULT_REF, DEFAULT_REWARD
from .testbed import check_problem, max_kl, optimum, simulate

ARTICLE_BETAS = (0.05, 0.1, 0.2, 0.5)


def beta_effect_data(ref_probs=DEFAULT_REF, reward=DEFAULT_REWARD, betas=ARTICLE_BETAS, measured_betas=None,
                     steps: int = 150, inner_steps: int = 10, lr: float = 0.1) -> dict:
    """Numbers behind :func:`plot_beta_effect` (KL in nats per response).

    ``frontier``: for a dense range of beta', the optimum's KL and expected
    reward (the best reward reachable at that KL). ``curves``: for each beta
    in ``betas``, total reward ``R(KL) - beta * KL`` along the frontier and
    its maximiser. ``equilibrium``: the closed-form KL of the optimum versus
    beta, and the KL reached by optimising the policy with exact gradients
    at ``measured_betas``.
    """
    ref, r = check_problem(ref_probs, reward)
    dense = np.geomspace(1e-3, 1e2, 300)
    frontier = [optimum(ref, r, b) for b in dense]
    kl_front = np.array([o.kl for o in frontier])
    reward_front = np.array([o.expected_reward for o in frontier])
    curves = {}
    for beta in betas:
        best = optimum(ref, r, beta)
        curves[float(beta)] = {
            "kl": kl_front.tolist(),
            "total_reward": (reward_front - beta * kl_front).tolist(),
            "optimum_kl": best.kl,
            "optimum_total_reward": best.objective,
        }
    beta_axis = np.linspace(0.01, 0.5, 50)
    measured_betas = np.geomspace(0.01, 0.5, 8) if measured_betas is None else np.asarray(measured_betas, float)
    measured = [simulate(ref, r, float(b), steps=steps, inner_steps=inner_steps, lr=lr).kl[-1] for b in measured_betas]
    return {
        "reference_reward": float((ref * r).sum()),
        "max_kl": max_kl(ref, r),
        "curves": curves,
        "equilibrium": {
            "beta": beta_axis.tolist(),
            "closed_form_kl": [optimum(ref, r, b).kl for b in beta_axis],
            "measured_beta": measured_betas.tolist(),
            "measured_kl": measured,
            "measured_closed_form_kl": [optimum(ref, r, b).kl for b in measured_betas],
        },
    }


def plot_beta_effect(out, ref_probs=DEFAULT_REF, reward=DEFAULT_REWARD, betas=ARTICLE_BETAS, **kwargs) -> dict:
    """Write the two-panel PNG (or any format matplotlib infers from ``out``); return the data.

    Left: total reward vs KL for several beta, as the article draws it, but
    with the reward a real function of the KL (the testbed's frontier) rather
    than a constant, so each curve has a maximum: the equilibrium. The
    article's straight lines (reward fixed at its reference value) are shown
    dashed. Right: equilibrium KL vs beta, closed form (line) and measured by
    optimisation (dots), instead of the article's illustrative ``0.8 / beta``.
    The file is written to a temporary name and renamed, so no half-written
    file is left behind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = beta_effect_data(ref_probs, reward, betas, **kwargs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    r0 = data["reference_reward"]
    for i, (beta, c) in enumerate(data["curves"].items()):
        color = f"C{i}"
        kl = np.asarray(c["kl"])
        axes[0].plot(kl, c["total_reward"], color=color, label=f"β={beta:g}")
        axes[0].plot(kl, r0 - beta * kl, color=color, linestyle="--", alpha=0.4)
        axes[0].plot([c["optimum_kl"]], [c["optimum_total_reward"]], "o", color=color)
    axes[0].plot([], [], color="gray", linestyle="--", alpha=0.4, label="article: reward held at E_ref[r]")
    axes[0].axhline(y=0, color="gray", linestyle=":", alpha=0.5)
    axes[0].set_xlabel("KL(π‖π_ref) (nats per response)")
    axes[0].set_ylabel("Total reward E[r] − β·KL")
    axes[0].set_title("Effect of β on total reward (dots: optimum)")
    axes[0].legend(fontsize=8)
    axes[0].grid(True, alpha=0.3)

    eq = data["equilibrium"]
    axes[1].plot(eq["beta"], eq["closed_form_kl"], "b-", linewidth=2, label="closed form KL(π*‖π_ref)")
    axes[1].plot(eq["measured_beta"], eq["measured_kl"], "o", color="C3", label="measured: policy optimised")
    axes[1].axhline(y=data["max_kl"], color="gray", linestyle="--", alpha=0.5, label="−log π_ref(argmax r)")
    axes[1].set_xlabel("β (KL coefficient)")
    axes[1].set_ylabel("Equilibrium KL (nats per response)")
    axes[1].set_title("Higher β → policy stays closer to reference")
    axes[1].legend(fontsize=8)
    axes[1].grid(True, alpha=0.3)
    fig.tight_layout()

    out = os.fspath(out)
    image_format = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(out, "wb", lambda f: fig.savefig(f, format=image_format, dpi=100))
    finally:
        plt.close(fig)
    return data
