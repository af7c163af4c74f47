"""Write the TRL logs in tests/data by running TRL itself (CPU, tiny random GPT-2; run once; committed).

    python tests/data/make_trl_logs.py ppo                          # TRL 1.0.0 (system python)
    .venv-trl-latest/bin/python tests/data/make_trl_logs.py grpo    # TRL 1.16.0 (scripts/setup.sh's venv)

Each file is the ``trainer_state.json`` that TRL's trainer saved in its last
``checkpoint-N`` folder (the file a TRL user has), copied unchanged:
  * trl_ppo_trainer_state.json: TRL 1.0.0 ``trl.experimental.ppo.PPOTrainer``, 12 updates of
    8 responses of 12 tokens, k1 estimator, kl_coef 0.05, learning rate 1e-2; a random GPT-2 reward model
    (head scaled x50).
  * trl_grpo_1.16_trainer_state.json: TRL 1.16.0 ``GRPOTrainer``, 12 steps, beta 0.05
    (its ``kl`` is logged because beta > 0).
The models are random (2 layers, width 32) and the numbers mean nothing beyond their
names and units, which is what the readers' tests check.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).parent
STEPS = 12


def _tiny(path: Path):
    sys.path.insert(0, str(HERE.parent))
    from test_integrations import _tiny_model_dir

    return _tiny_model_dir(path)


def _copy_state(out: Path, name: str) -> None:
    shutil.copyfile(out / f"checkpoint-{STEPS}" / "trainer_state.json", HERE / name)
    print("wrote", HERE / name)


def ppo() -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GPT2ForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = _tiny(tmp / "model")
        policy = AutoModelForCausalLM.from_pretrained(tmp / "model")
        ref = AutoModelForCausalLM.from_pretrained(tmp / "model")
        config = policy.config
        config.num_labels = 1
        torch.manual_seed(1)
        reward = GPT2ForSequenceClassification(config)
        with torch.no_grad():
            reward.score.weight.mul_(50.0)  # scores of order 1, so the policy moves and the KL grows
        value = GPT2ForSequenceClassification(config)
        value.transformer.load_state_dict(policy.transformer.state_dict())
        prompts = [" ".join(f"w{(i * 7 + j) % 61}" for j in range(4)) for i in range(8 * STEPS)]
        dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
        args = PPOConfig(
            output_dir=str(tmp / "out"), seed=0, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="steps", save_steps=STEPS, disable_tqdm=True, logging_steps=1,
            per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
            local_rollout_forward_batch_size=8, response_length=12, stop_token=None, missing_eos_penalty=None,
            temperature=1.0, kl_coef=0.05, kl_estimator="k1", learning_rate=1e-2, total_episodes=8 * STEPS,
            num_sample_generations=0, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=dataset, value_model=value)
        trainer.train()
        _copy_state(tmp / "out", "trl_ppo_trainer_state.json")


def grpo() -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = _tiny(tmp / "model")
        prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(4))
                                                for i in range(4 * STEPS)]})

        def reward(completions, **kwargs):
            return [float(c.count("w3")) for c in completions]

        args = GRPOConfig(output_dir=str(tmp / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=8, beta=0.05, learning_rate=5e-2,
                          logging_steps=1, save_strategy="steps", save_steps=STEPS, report_to=[], use_cpu=True,
                          bf16=False, disable_tqdm=True, seed=0)
        trainer = GRPOTrainer(model=str(tmp / "model"), reward_funcs=reward, args=args, train_dataset=prompts,
                              processing_class=tok)
        trainer.train()
        _copy_state(tmp / "out", "trl_grpo_1.16_trainer_state.json")


if __name__ == "__main__":
    import trl

    warnings.filterwarnings("ignore")
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    want = {"ppo": "1.0.0", "grpo": "1.16.0"}
    if which not in want:
        raise SystemExit("usage: make_trl_logs.py ppo|grpo")
    if trl.__version__ != want[which]:
        raise SystemExit(f"{which} is made with TRL {want[which]}, this python has TRL {trl.__version__}")
    {"ppo": ppo, "grpo": grpo}[which]()
