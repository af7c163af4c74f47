"""TRL's trainers driven on the same work as klbelt's, each timed in its own process.

Each function takes a benchmark spec and returns ``{"intervals": [...], ...}``: the
seconds of each timed update (from the end of the update before it to its own end,
read by a ``TrainerCallback.on_step_end``), so what TRL does per update counts
whole: ``generate()``, logits and values over every position, its optimiser and
its ``gc.collect()`` calls. Run with any TRL the interpreter holds (the version is
reported), e.g. a venv with the newest TRL.

* :func:`ppo_gpt2` (``klbelt bench trainer``): TRL's PPOTrainer on the random GPT-2
  work of :func:`klbelt.bench.work.gpt2_work`. Configured for the same work:
  ``per_device_train_batch_size`` = batch, ``gradient_accumulation_steps=1``,
  ``num_mini_batches`` and ``num_ppo_epochs`` as the setting,
  ``local_rollout_forward_batch_size`` = batch, ``response_length`` = response tokens
  with ``stop_token=None``, no gradient checkpointing (PPOConfig's default recomputes the
  forward), fp32, ``num_sample_generations=0``, no saving, no reporting. The value model:
  a sequence classifier on a copy of the policy's trunk with a zero head (klbelt's init).
* :func:`grpo_english` (``--model``): TRL's GRPOTrainer on the English demo's update: the
  same model, LoRA config, prompts, VADER reward, batch (``num_generations=4``,
  ``per_device_train_batch_size=16``), ``max_completion_length=24`` with
  ``min_new_tokens=24``, ``beta=0.1`` (the reference is then the model with the adapters
  disabled, as in klbelt), the same learning rate, ``bf16`` as klbelt's, no gradient
  checkpointing, no logging or saving.
* :func:`ppo_english` (``--model``): TRL's PPOTrainer on the same English work (see its
  docstring for what it needs that klbelt's update does not: a critic).
"""

from __future__ import annotations

import time

from .._memory import peak_growth_mb, reset_peak_kib
from .._timing import intervals, peak_rss_mb
from ..work import english_lora_config, english_work, gpt2_work, prewarm


def _clock(ends: list[float]):
    """A TrainerCallback appending the end time of every optimiser step (one per update here)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    return Clock()


def _check_updates(ends: list[float], total: int) -> None:
    if len(ends) != total:
        raise RuntimeError(f"TRL ran {len(ends)} updates, expected {total}")


def ppo_gpt2(spec: dict) -> dict:
    """TRL's PPOTrainer on the GPT-2 work: timed updates and the peak memory growth during training."""
    import tempfile
    import warnings

    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    tok, prompts, policy, ref, reward = gpt2_work(spec)
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, seed=spec["seed"], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
            per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
            num_mini_batches=spec["minibatches"], num_ppo_epochs=spec["epochs"], local_rollout_forward_batch_size=spec["batch"],
            response_length=spec["response_tokens"], stop_token=None, missing_eos_penalty=None, temperature=1.0,
            kl_coef=0.05, kl_estimator="k1", learning_rate=1e-5, total_episodes=spec["batch"] * total,
            num_sample_generations=0, dataloader_num_workers=0,
        )
        prewarm(policy, reward, tok(prompts[: spec["batch"]], return_tensors="pt")["input_ids"])
        torch.manual_seed(spec["seed"])
        rss = reset_peak_kib()
        # TRL's value model: a sequence classifier on a copy of the policy's trunk, zero head (klbelt's init)
        value = GPT2ForSequenceClassification(policy.config)
        value.transformer.load_state_dict(policy.transformer.state_dict())
        torch.nn.init.zeros_(value.score.weight)
        trainer = PPOTrainer(
            args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward, train_dataset=dataset,
            value_model=value, callbacks=[_clock(ends)],
        )
        trainer.train()
        peak = peak_growth_mb(rss)
    _check_updates(ends, total)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {"intervals": intervals(ends, spec["warmup"], spec["updates"]), "peak_mb": peak, "optimizer": type(optimizer).__name__}


def grpo_english(spec: dict) -> dict:
    """TRL's GRPOTrainer on the English demo's update: timed updates, peak RSS, TRL's version."""
    import tempfile
    import warnings

    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from klbelt.demo.rewards import proxy_reward

    warnings.filterwarnings("ignore")
    model, tok, prompts, cfg = english_work(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    def vader(completions, **kwargs):
        return proxy_reward(list(completions)).tolist()

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, seed=0, use_cpu=True, bf16=spec["bf16"], fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=cfg.batch_size, num_generations=cfg.group_size, gradient_accumulation_steps=1,
            max_completion_length=cfg.max_new_tokens, generation_kwargs={"min_new_tokens": cfg.max_new_tokens},
            temperature=cfg.temperature, beta=cfg.kl_coef, learning_rate=cfg.lr, max_steps=total, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[vader], args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=tok, peft_config=english_lora_config(model, cfg), callbacks=[_clock(ends)])
        trainer.train()
    _check_updates(ends, total)
    return {"intervals": intervals(ends, spec["warmup"]), "peak_rss_mb": peak_rss_mb(), "trl_version": trl.__version__}


def vader_reward_model(tokenizer, response_tokens: int):
    """A reward model in the shape TRL's PPO scores with: the VADER proxy of each response.

    TRL's ``get_reward(model, ...)`` runs ``getattr(model, model.base_model_prefix)`` on the
    sequences and reads ``model.score(hidden_states[-1])`` at the last response token. Here
    the "backbone" decodes the last ``response_tokens`` tokens of each row (TRL's pads
    excluded) and returns klbelt's VADER proxy as a one-channel hidden state at every
    position; ``score`` is the identity. ``tokens_scored`` counts the response tokens seen,
    so a caller can check that every response was full length.
    """
    import types

    import torch

    from klbelt.demo.rewards import proxy_reward

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens_scored = 0

        def forward(self, input_ids, attention_mask, **kwargs):
            ids, mask = input_ids[:, -response_tokens:], attention_mask[:, -response_tokens:].bool()
            self.tokens_scored += int(mask.sum())
            texts = [tokenizer.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]
            scores = proxy_reward(texts).float()
            hidden = scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1)
            return types.SimpleNamespace(hidden_states=(hidden,))

    class VaderRewardModel(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.score = torch.nn.Identity()

    return VaderRewardModel()


def ppo_english(spec: dict) -> dict:
    """TRL's PPOTrainer on the English demo's work: timed updates, peak RSS, TRL's version.

    The same as klbelt's update: the model, LoRA (rank, alpha, targets) on the policy with
    the reference = the adapters disabled (``peft_config``, ``ref_model=None``), 16 sequences
    of 24 sampled tokens at temperature 1, always full length (EOS and pad in the model's
    ``generation_config.suppress_tokens``, checked through the reward model's token count), the VADER
    proxy as the reward, k1 KL in the reward at beta 0.1, klbelt's epochs and minibatches,
    one AdamW step per update, the learning rate, bf16 as klbelt's.

    What differs, because TRL's PPO needs it: a critic. The value model is a
    ``AutoModelForSequenceClassification`` on a copy of the same backbone (TRL's expected
    form), zero-initialised head, with the same LoRA on its backbone (so LoRA on both sides,
    no full fine-tune anywhere); TRL scores values in the rollout and trains them in each
    minibatch (GAE advantages), where klbelt's English update uses a group baseline and no
    critic. And 16 distinct prompts per batch (TRL's PPO has no groups) instead of 4 x 4.
    """
    import copy
    import tempfile
    import warnings

    import torch
    import trl
    from datasets import Dataset
    from peft import inject_adapter_in_model
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    model, tok, prompts, cfg = english_work(spec)
    total = spec["warmup"] + spec["updates"]
    R = cfg.max_new_tokens
    # full-length responses, like klbelt's block_eos: TRL's PPO builds its own GenerationConfig, and
    # transformers fills the fields it leaves unset (suppress_tokens, not min_new_tokens) from the model's
    model.generation_config.suppress_tokens = sorted({tok.eos_token_id, tok.pad_token_id})
    lora = english_lora_config(model, cfg)
    value_config = copy.deepcopy(model.config)
    value_config.num_labels, value_config.pad_token_id = 1, tok.pad_token_id
    value = AutoModelForSequenceClassification.from_config(value_config)
    backbone = getattr(value, value.base_model_prefix)
    backbone.load_state_dict(getattr(model, model.base_model_prefix).state_dict())
    torch.nn.init.zeros_(value.score.weight)
    value.requires_grad_(False)
    inject_adapter_in_model(copy.deepcopy(lora), backbone)
    for name, p in value.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("score."))
    reward = vader_reward_model(tok, R)
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    kl_estimator = cfg.kl_estimator if cfg.kl_estimator in ("k1", "k3") else "k1"
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, seed=0, use_cpu=True, bf16=spec["bf16"], fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=cfg.minibatches, num_ppo_epochs=cfg.ppo_epochs, local_rollout_forward_batch_size=cfg.batch_size,
            response_length=R, stop_token=None, missing_eos_penalty=None, temperature=cfg.temperature,
            kl_coef=cfg.kl_coef, kl_estimator=kl_estimator, learning_rate=cfg.lr, total_episodes=cfg.batch_size * total,
            num_sample_generations=0, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=model, ref_model=None, reward_model=reward,
                             train_dataset=dataset, value_model=value, peft_config=lora, callbacks=[_clock(ends)])
        trainer.train()
    _check_updates(ends, total)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"intervals": intervals(ends, spec["warmup"]), "peak_rss_mb": peak_rss_mb(), "trl_version": trl.__version__,
            "response_tokens_per_update": reward.backbone.tokens_scored / total, "trainable_parameters": trainable}
