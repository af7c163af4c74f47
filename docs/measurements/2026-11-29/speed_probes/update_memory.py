"""Peak RSS (MB) in each phase of 6 demo updates through ``train()``, sampled every 3 ms from
/proc/self/status, with the process's high-water mark after each update.

python update_memory.py [bf16_base=1|0]   (1: the demo's setting)
"""
import sys
import tempfile
import threading
import time
from dataclasses import replace

import torch

import klbelt.rl.trainer as T
from klbelt.bench.work import english_work
from klbelt.demo.rewards import proxy_reward

torch.set_num_threads(2)


def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024


phase, peaks = ["load"], {}


def watch():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), status_mb("VmRSS"))
        time.sleep(0.003)


threading.Thread(target=watch, daemon=True).start()
model, tok, prompts, cfg = english_work(dict(model="smollm2", warmup=2, updates=3, bf16=True, threads=2))
cfg = replace(cfg, bf16_base=(sys.argv[1:] or ["bf16_base=1"])[0].endswith("1"))
for name in ("sample_batch", "score_batch", "ppo_epochs", "step_metrics"):
    def wrapper(*a, _f=getattr(T, name), _n=name, **k):
        phase[0] = _n
        out = _f(*a, **k)
        phase[0] = "other"
        return out
    setattr(T, name, wrapper)


def on_step(record):
    print(f"update: HWM {status_mb('VmHWM')} MB, phase peaks {dict(peaks)}", flush=True)
    peaks.clear()


with tempfile.TemporaryDirectory() as out:
    T.train(replace(cfg, out=out, steps=6), model, tok, prompts, proxy_reward, on_step=on_step, warn_alerts=False)
