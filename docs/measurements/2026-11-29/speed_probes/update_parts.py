"""Seconds of each part of 6 demo updates through ``train()`` (beta 0.1 fixed, as the bench): the weight
sync, the sampling loop, the reward, the reference forward, PPO's forward, the backward and AdamW.

python update_parts.py [bf16_base=1|0] [attn=NAME]   (bf16_base 1: the demo's setting; attn: attn_implementation,
default the demo config's)
"""
import collections
import sys
import tempfile
import time
from dataclasses import replace

import torch

import klbelt.rl.lora as L
import klbelt.rl.merged_sampler as M
import klbelt.rl.trainer as T
import klbelt.rl.update as U
from klbelt.bench.work import english_work
from klbelt.demo.rewards import proxy_reward

torch.set_num_threads(2)
model, tok, prompts, cfg = english_work(dict(model="smollm2", warmup=2, updates=3, bf16=True, threads=2))
args = dict(a.split("=", 1) for a in sys.argv[1:])
cfg = replace(cfg, bf16_base=args.get("bf16_base", "1") == "1", attn_implementation=args.get("attn", cfg.attn_implementation))
print("bf16_base", cfg.bf16_base, "attn_implementation", cfg.attn_implementation)
times = collections.defaultdict(float)


def timed(owner, name, label):
    f = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        times[label] += time.perf_counter() - t0
        return out
    setattr(owner, name, wrapper)


for owner, name, label in [(M.MergedCopySampler, "refresh", "sync"), (M, "sample", "sampling loop"), (U, "call_reward", "reward"),
                           (L.Reference, "logprobs", "reference forward"), (U, "response_logprobs", "PPO forward"),
                           (U, "optimizer_step", "backward + AdamW"), (T, "sample_batch", "1 sample"), (T, "score_batch", "2 score"),
                           (T, "ppo_epochs", "4 ppo")]:
    timed(owner, name, label)
ends = [time.perf_counter()]


def on_step(record):
    ends.append(time.perf_counter())
    print(f"update {len(ends) - 1}: {ends[-1] - ends[-2]:.2f} s", {k: round(v, 2) for k, v in times.items()}, flush=True)
    times.clear()


with tempfile.TemporaryDirectory() as out:
    T.train(replace(cfg, out=out, steps=6), model, tok, prompts, proxy_reward, on_step=on_step, warn_alerts=False)
