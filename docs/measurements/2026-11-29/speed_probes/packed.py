"""bf16 linear layers at decode size (16 rows): F.linear on a plain weight against oneDNN's prepacked
weight (klbelt.rl.merged_sampler.PackedLinear), for 150 distinct 1536 x 576 weights (more than the
caches hold, as in a decode step) and for SmolLM2's LM head (49152 x 576); equality checked."""
import statistics
import time

import torch

from klbelt.rl.merged_sampler import PackedLinear

torch.set_num_threads(2)


def per_call_us(fn, calls, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


g = torch.Generator().manual_seed(0)
weights = [torch.randn(1536, 576, generator=g).to(torch.bfloat16) for _ in range(150)]
x = torch.randn(16, 576, generator=g).to(torch.bfloat16)
t = time.perf_counter()
packed = [PackedLinear(w, None, 16) for w in weights]
pack_us = (time.perf_counter() - t) / len(weights) * 1e6
plain_us = per_call_us(lambda: [torch.nn.functional.linear(x, w) for w in weights], len(weights))
packed_us = per_call_us(lambda: [p(x) for p in packed], len(weights))
same = all(torch.equal(torch.nn.functional.linear(x, w), p(x)) for w, p in zip(weights, packed))
print(f"1536x576, 16 rows: plain {plain_us:.0f} us, packed {packed_us:.0f} us ({plain_us / packed_us:.2f}x), pack once {pack_us:.0f} us, equal {same}")
head = torch.randn(49152, 576, generator=g).to(torch.bfloat16)
head_packed = PackedLinear(head, None, 16)
plain_us = per_call_us(lambda: [torch.nn.functional.linear(x, head) for _ in range(10)], 10)
packed_us = per_call_us(lambda: [head_packed(x) for _ in range(10)], 10)
print(f"LM head 49152x576, 16 rows: plain {plain_us:.0f} us, packed {packed_us:.0f} us ({plain_us / packed_us:.2f}x), "
      f"equal {torch.equal(torch.nn.functional.linear(x, head), head_packed(x))}")
