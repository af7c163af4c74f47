"""Metric names (foreign -> klbelt's, with units) and the :class:`Run` every reader returns.

Shared by the readers of files (:mod:`klbelt.monitor.readers`) and of W&B and
MLflow runs (:mod:`klbelt.monitor.external`), so neither imports the other's
module to learn a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: foreign metric name -> klbelt name. TRL's PPO/RLOO "objective/kl" is the KL
#: summed over a response (kl.sum(1).mean()), hence nats/sequence; GRPO's "kl"
#: is a masked per-token mean, hence nats/token.
ALIASES = {
    "objective/kl": "kl_seq",
    "objective/scores": "reward",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/entropy": "entropy_seq",
    "objective/non_score_reward": "non_score_reward",
    "objective/kl_coef": "kl_coef",
    "beta": "kl_coef",
    "kl_ctl": "kl_coef",
    "ppo/mean_scores": "reward",
    "rewards/mean": "reward",
    "gold_score": "gold_reward",
    # sampler/trainer mismatch (klbelt.kl.mismatch; units in METRICS). TRL GRPO's "sampling/..." (vLLM IS
    # correction): mean/max of |log pi - log mu| (nats) and the IS ratio after truncation/masking.
    "sampling/sampling_logp_difference/mean": "mismatch_abs_logratio_mean",
    "sampling/sampling_logp_difference/max": "mismatch_max_logratio",
    "sampling/importance_sampling_ratio/min": "is_weight_min",
    "sampling/importance_sampling_ratio/mean": "is_weight_mean",
    "sampling/importance_sampling_ratio/max": "is_weight_max",
    # verl's rollout correction: KL(rollout || training) per token, k1 and k3; chi-square; IS weights
    "rollout_corr/kl": "mismatch_kl",
    "rollout_corr/k3_kl": "mismatch_k3",
    "rollout_corr/chi2_token": "mismatch_chi2",
    "rollout_corr/log_ppl_abs_diff": "mismatch_log_ppl_abs_diff",
    "rollout_corr/rollout_is_mean": "is_weight_mean",
    "rollout_corr/rollout_is_min": "is_weight_min",
    "rollout_corr/rollout_is_max": "is_weight_max",
    # OpenRLHF: vllm_kl = masked mean of (rollout - old) log-probs, the k1 of KL(mu || pi), nats/token
    "vllm_kl": "mismatch_kl",
    "_step": "step",  # a W&B history CSV export
    # verl (checked on verl 0.9.1; docs/readers.md): KL to the reference, both nats/token. kl_loss: the
    # kl_loss_type estimator (default low_var_kl = k3) aggregated by loss_agg_mode (default token-mean);
    # reward_kl_penalty: mean over sequences of the per-sequence token-mean of the in-reward KL
    "actor/kl_loss": "kl",
    "actor/kl_coef": "kl_coef",
    "actor/reward_kl_penalty": "kl",
    "actor/reward_kl_penalty_coeff": "kl_coef",
    "critic/score/mean": "reward",
    "actor/entropy": "entropy",
    # KL between the old (rollout-time) and the new policy inside a PPO update (a step size, NOT the KL to
    # the reference): verl actor/ppo_kl, OpenRLHF ppo_kl, TRL PPO policy/approxkl_avg, approx_kl
    "actor/ppo_kl": "kl_old_policy",
    "ppo_kl": "kl_old_policy",
    "approx_kl": "kl_old_policy",
    "policy/approxkl_avg": "kl_old_policy",
}
_PREFIXES = ("klbelt/", "train/")


class RunReadError(ValueError):
    """A run log that cannot be read; ``str(err)`` is one line naming the file and the problem."""


@dataclass
class Run:
    """A run's history as read from a file."""

    path: Path
    format: str
    records: list[dict]
    notes: list[str] = field(default_factory=list)


def canonical_name(name: str) -> str:
    """klbelt's name for a foreign metric name (prefixes ``train/``/``klbelt/`` dropped, aliases applied)."""
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    return ALIASES.get(name, name)
