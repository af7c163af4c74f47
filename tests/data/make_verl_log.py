"""Write verl_file_logger.jsonl with verl 0.9.1 itself (run once; the file is committed test data).

    python tests/data/make_verl_log.py

verl's own ``apply_kl_penalty`` computes the KL metrics of 12 batches (a policy
drifting slowly from its reference, the in-reward beta held by a klbelt
controller behind verl's interface) and verl's own ``Tracking(default_backend="file")``
writes them, one ``{"step": N, "data": {...}}`` line per step.
"""

import os
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty
    from verl.utils.tracking import Tracking

    import klbelt
    from klbelt.integrations.verl import VerlKLController

    os.environ["VERL_FILE_LOGGER_PATH"] = str(out)
    tracker = Tracking(project_name="klbelt", experiment_name="verl_kl", default_backend="file")
    ctrl = VerlKLController(klbelt.AdaptiveKLController(0.05, target_kl=0.05, rule="proportional", horizon=64))
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        ref = -torch.rand(8, 16, generator=gen) * 2
        logp = ref + 0.02 * step ** 0.5 * torch.randn(8, 16, generator=gen)
        mask = torch.ones(8, 16)
        mask[:, 12:] = 0
        scores = torch.zeros(8, 16)
        scores[:, 11] = 0.5 + 0.02 * step + 0.05 * torch.randn(8, generator=gen)
        batch = TensorDict({"old_log_probs": logp, "ref_log_prob": ref, "response_mask": mask,
                            "token_level_scores": scores}, batch_size=[8])
        _, metrics = apply_kl_penalty(DataProto(batch=batch), ctrl, kl_penalty="low_var_kl")
        metrics["critic/score/mean"] = float(scores.sum(-1).mean())
        tracker.log(data=metrics, step=step)
    del tracker


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("verl_file_logger.jsonl"))
