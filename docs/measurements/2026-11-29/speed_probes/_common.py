"""What the probes share: SmolLM2 with the demo's LoRA on 2 threads, the demo's 4 x 4 prompt batch, a median timer."""
import statistics
import time

import torch

from klbelt.bench.work import english_work
from klbelt.rl.lora import apply_lora


def lora_batch(move_adapters: bool = False):
    """``(policy, tok, cfg, ids, mask)``: the demo's model with LoRA, its first 4 prompts x 4, padded."""
    torch.set_num_threads(2)
    model, tok, prompts, cfg = english_work({"model": "smollm2", "bf16": True, "warmup": 1, "updates": 1})
    policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if move_adapters:  # adapters away from zero, as after some training
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    batch = [p for p in prompts[: cfg.batch_size // cfg.group_size] for _ in range(cfg.group_size)]
    enc = tok(batch, return_tensors="pt", padding=True)
    return policy, tok, cfg, enc["input_ids"], enc["attention_mask"]


def median_seconds(fn, n: int = 4) -> float:
    """Median wall time of ``n`` calls after one warm-up call."""
    times = []
    for _ in range(n + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])
