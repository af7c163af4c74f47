"""A klbelt controller driving TRL's GRPO ``beta``, and klbelt's monitor watching the run.

    python examples/trl_grpo_kl.py                          # 1 process, CPU (checked here)
    accelerate launch examples/trl_grpo_kl.py               # N processes / GPUs, same script

One line does it: ``klbelt.integrations.trl.attach(trainer, controller=...)``.
TRL 1.0.0's ``GRPOTrainer`` keeps beta in ``trainer.beta`` and reads it on every
loss computation (``per_token_loss + self.beta * per_token_kl`` in
``GRPOTrainer._compute_loss``), so a callback that assigns ``trainer.beta``
between steps changes the next step's loss: no subclass needed. ``attach`` refuses
(with an error) the two set-ups where that silently does nothing:
  * start with beta > 0 and keep it > 0 (``min_kl_coef``): at beta == 0 TRL
    loads no reference model, and skips the KL term *and its logging*, so the
    controller would never hear from the KL again;
  * ``use_liger_kernel=True`` copies beta into the fused loss at construction:
    a changed ``trainer.beta`` is then NOT used.
TRL logs ``kl`` as a per-token mean of k3 (nats/token). Across processes it is
a mean of per-process means, identical on every process, so every process's
controller computes the same beta.
"""

import json
import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

import klbelt
from klbelt.integrations import trl as kltrl


def tiny_model(path):
    """A random 2-layer GPT-2 and a word-level tokenizer, saved locally (no hub access)."""
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def main(out):
    tokenizer = tiny_model(f"{out}/model")
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(4)) for i in range(16)]})

    def reward(completions, **kwargs):  # toy reward: how often the completion says "w3"
        return [float(c.count("w3")) for c in completions]

    # target 0.05 nats/token; the step rule keeps beta in [0.01, 1.0], never 0
    controller = klbelt.AdaptiveKLController(0.1, target_kl=0.05, unit="token-mean")
    args = GRPOConfig(output_dir=f"{out}/run", max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, beta=controller.kl_coef, learning_rate=1e-2, logging_steps=1,
                      save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=f"{out}/model", reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    # the one line: beta driven by the controller (state saved in every checkpoint), KL monitored
    _, monitor_cb = kltrl.attach(trainer, controller=controller, report=False, warn=False)
    trainer.remove_callback(PrinterCallback)  # keep the output to the lines below
    trainer.train()

    betas = trainer.accelerator.gather(torch.tensor([trainer.beta], dtype=torch.float64, device=trainer.accelerator.device))
    assert torch.all(betas == betas[0]), betas
    if trainer.is_world_process_zero():
        print(f"beta identical on {len(betas)} processes")
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        for rec, loss in zip(monitor_cb.monitor.history, losses):
            print(f"step {rec['step']}: kl {rec['kl']:.5f} nats/token, beta used {rec['kl_coef']:.4f}, loss {loss:.4g}")
            # one process, one on-policy iteration, equal-length completions: the surrogate's value
            # is 0 (advantages sum to 0 per group), so loss = beta * kl shows TRL used the new beta
            if trainer.accelerator.num_processes == 1:
                assert abs(loss - rec["kl_coef"] * rec["kl"]) <= 1e-3 * loss
        print(f"trainer.beta now {trainer.beta:.4f} (controller: {controller.kl_coef:.4f}, "
              f"{controller.n_updates} updates)")
        saved = json.load(open(f"{out}/run/checkpoint-2/{kltrl.STATE_FILE}"))
        assert saved["kl_coef"] == trainer.beta == controller.kl_coef
        print("controller drove TRL beta; state saved in checkpoint-2/kl_controller.json")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
