"""Write the foreign-format logs in tests/data that no framework wrote here (run once; committed).

    python tests/data/make_foreign_logs.py

Built from each framework's documented / source-code metric names, NOT written by
the framework (see docs/readers.md):
  * trl_ppo_trainer_state.json: a transformers trainer_state.json whose log_history
    holds TRL 1.0.0 PPOTrainer's metric names (trl/experimental/ppo/ppo_trainer.py);
    objective/kl is per sequence (KL summed over the response), 0.5-0.9 nats/sequence
    over 16-token responses (0.03-0.06 nats/token).
  * openrlhf_tb/: TensorBoard events with OpenRLHF 0.9's "train/<key>" scalars
    (kl: per-token k1 mean, reward, ppo_kl: old-vs-new policy), written with
    torch's SummaryWriter.
  * verl_old_policy_only.jsonl: verl's file-logger format with actor/ppo_kl (old-vs-new
    policy KL) as its only KL column.
"""

import json
import math
from pathlib import Path

HERE = Path(__file__).parent


def trl_ppo():
    log = []
    for step in range(1, 13):
        kl_seq = 0.5 + 0.4 * (1 - math.exp(-step / 4))
        log.append({"episode": 8 * step, "eps": 3, "objective/kl": kl_seq, "objective/entropy": 30.0 - 0.1 * step,
                    "objective/non_score_reward": -0.05 * kl_seq, "objective/rlhf_reward": 0.2 + 0.02 * step,
                    "objective/scores": 0.25 + 0.02 * step, "policy/approxkl_avg": 0.004,
                    "policy/clipfrac_avg": 0.01, "loss/policy_avg": -0.01, "loss/value_avg": 0.2,
                    "val/clipfrac_avg": 0.0, "policy/entropy_avg": 1.9, "val/ratio": 1.0, "val/ratio_var": 1e-5,
                    "val/num_eos_tokens": 8, "lr": 3e-6, "epoch": step / 12, "step": step})
    state = {"global_step": 12, "max_steps": 12, "log_history": log}
    (HERE / "trl_ppo_trainer_state.json").write_text(json.dumps(state, indent=1))


def openrlhf():
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(HERE / "openrlhf_tb"))
    for step in range(1, 13):
        for k, v in {"kl": 0.02 + 0.002 * step, "reward": 0.1 + 0.01 * step, "ppo_kl": 0.003,
                     "policy_loss": -0.02, "response_length": 40.0, "return": 0.1}.items():
            w.add_scalar(f"train/{k}", v, step)
    w.close()


def verl_old_policy_only():
    lines = [json.dumps({"step": s, "data": {"actor/ppo_kl": 0.002, "actor/pg_loss": -0.01}}) for s in range(1, 13)]
    (HERE / "verl_old_policy_only.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    trl_ppo()
    openrlhf()
    verl_old_policy_only()
