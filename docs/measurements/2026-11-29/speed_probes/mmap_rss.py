"""Resident memory (anonymous / file-backed, MB) of SmolLM2 loaded from klbelt's safetensors cache:
loaded, every weight read once, then after ``hold_base_in_bf16`` (which also releases the file's mmap)."""
import torch

from klbelt.demo.models import load_model
from klbelt.rl.lora import apply_lora, hold_base_in_bf16


def rss():
    keys = ("VmRSS", "RssAnon", "RssFile")
    return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(keys)}


model, _ = load_model("smollm2")
print("loaded", rss())
with torch.no_grad():
    sum(float(p.sum()) for p in model.parameters())
print("every weight read", rss())
held = hold_base_in_bf16(apply_lora(model, 16))
print(f"held {len(held)} linear weights in bf16", rss())
