"""One attention layer at the English demo's shapes, Hugging Face's SDPA path against klbelt_fp32.

SmolLM2's heads (9 query, 3 key/value, dim 64), 16 sequences of 33 positions (6 left-padded by 3), bf16 inputs
as under autocast, 2 threads; medians of 30 calls in milliseconds. "train": all 33 queries (forward, and
forward+backward); "decode": one query against the 33 cached keys.

python attention_kernels.py
"""
import statistics
import time
import types

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from klbelt.rl.attention import fp32_attention

torch.set_num_threads(2)
B, H, KV, L, D = 16, 9, 3, 33, 64
layer = types.SimpleNamespace(num_key_value_groups=H // KV, training=True, is_causal=True)


def median_ms(fn, n=30):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


pad = torch.ones(B, L, dtype=torch.bool)
pad[:6, :3] = False
additive = eager_mask(B, L, L, attention_mask=pad, dtype=torch.float32)  # what klbelt_fp32 is given
boolean = sdpa_mask(B, L, L, attention_mask=pad, allow_is_causal_skip=False)  # what SDPA is given
for Lq, shape in [(L, "train"), (1, "decode")]:
    q = torch.randn(B, H, Lq, D, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, L, D, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, L, D, dtype=torch.bfloat16, requires_grad=True)
    for fn, mask in [(sdpa_attention_forward, boolean[:, :, -Lq:]), (fp32_attention, additive[:, :, -Lq:])]:
        def forward():
            with torch.no_grad():
                return fn(layer, q, k, v, mask, scaling=D ** -0.5)[0]

        def forward_backward():
            fn(layer, q, k, v, mask, scaling=D ** -0.5)[0].float().sum().backward()

        line = f"{shape:6s} {fn.__name__:22s} forward {median_ms(forward):.3f} ms"
        if shape == "train":
            line += f"   forward+backward {median_ms(forward_backward):.3f} ms"
        print(line)
