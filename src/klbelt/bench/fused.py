"""``klbelt bench fused``: log-probs and exact KL from hidden states, with and without the logits.

Three implementations per function, timed and memory-measured on the same inputs
(``hidden [N, H]``, LM-head ``weight [V, H]``):

* ``naive``: ``z = hidden @ weight.T``, ``log_softmax(z.float())``, gather (or the KL from two log-softmaxes);
* ``unfused``: the same matmul, then klbelt's logits kernel (``logprobs_from_logits`` / ``kl_from_logits``);
* ``fused``: ``logprobs_from_hidden`` / ``kl_from_hidden`` (no ``[N, V]`` tensor).

On a CUDA device with ``liger_kernel`` installed, Liger-Kernel's fused linear
cross-entropy (``-logprob`` summed) is timed too as the anchor (``liger_ms``).
Extra peak memory is measured as in ``klbelt bench kernels`` (``_memory``: peak
resident memory of one call minus what it returns, in a fresh process per
configuration; on CUDA the allocator's peak). ``logits_mb`` is the size of the
fp32 ``[N, V]`` logits, the yardstick of the targets (extra peak <= 1/8 of it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DESCRIPTION = "time and extra peak memory of log-probs / exact KL from hidden states: naive, matmul + kernel, fused"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _names(valid):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        bad = [v for v in values if v not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(valid)}; got {text!r}")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=_ints, default=[4096], help="rows N (response tokens), comma-separated (default 4096)")
    parser.add_argument("--hidden", type=_ints, default=[576, 2048], help="hidden sizes H (default 576,2048)")
    parser.add_argument("--vocab", type=_ints, default=[49152, 151936], help="vocabulary sizes V (default 49152,151936)")
    parser.add_argument("--dtypes", type=_names(("float32", "bfloat16")), default=["float32", "bfloat16"],
                        help="input dtypes (default float32,bfloat16)")
    parser.add_argument("--functions", type=_names(("logprobs", "kl")), default=["logprobs", "kl"],
                        help="functions to measure (default logprobs,kl)")
    parser.add_argument("--passes", type=_names(("forward", "forward+backward")), default=["forward", "forward+backward"],
                        help="passes (default forward,forward+backward)")
    parser.add_argument("--quick", action="store_true",
                        help="one small configuration: N=1024, H=576, V=49152, float32 (about a minute on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation; the median is reported (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurement")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON (a list of rows)")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _impls(function: str, torch, with_liger: bool):
    from klbelt.kl import kl_from_hidden, kl_from_logits, logprobs_from_hidden, logprobs_from_logits

    if function == "logprobs":
        impls = {
            "naive": lambda h, w, t, rh, rw: torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1),
            "unfused": lambda h, w, t, rh, rw: logprobs_from_logits(h @ w.T, t),
            "fused": lambda h, w, t, rh, rw: logprobs_from_hidden(h, w, t),
        }
        if with_liger:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            impls["liger"] = lambda h, w, t, rh, rw: -loss(w, h, t).reshape(1)
        return impls

    def naive_kl(h, w, t, rh, rw):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        logq = torch.log_softmax((rh @ rw.T).float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1)

    return {
        "naive": naive_kl,
        "unfused": lambda h, w, t, rh, rw: kl_from_logits(h @ w.T, rh @ rw.T),
        "fused": lambda h, w, t, rh, rw: kl_from_hidden(h, w, rh, rw),
    }


def _child(spec: dict) -> dict:
    """One configuration in this (fresh) process: every implementation's median time and extra peak."""
    import torch

    from . import _memory

    torch.manual_seed(0)
    n, hsize, v, device = spec["rows"], spec["hidden"], spec["vocab"], spec["device"]
    dtype = getattr(torch, spec["dtype"])
    backward = spec["pass"] == "forward+backward"
    h = (torch.randn(n, hsize, device=device) * 0.5).to(dtype).requires_grad_(backward)
    w = (torch.randn(v, hsize, device=device) / hsize**0.5).to(dtype).requires_grad_(backward)
    rh = (h.detach() + 0.1 * torch.randn_like(h, dtype=torch.float32).to(dtype)).contiguous()
    rw = w.detach().clone()
    t = torch.randint(0, v, (n,), device=device)
    with_liger = device.startswith("cuda") and spec.get("liger", False)
    out = {}
    for name, fn in _impls(spec["function"], torch, with_liger).items():
        def call(fn=fn):
            res = fn(h, w, t, rh, rw)
            if backward:
                return (res.detach(), *torch.autograd.grad(res.sum(), [h, w]))
            return (res,)

        times = []
        for i in range(1 + spec["repeats"]):  # the first call warms up (compilation, thread pools)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            res = call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - start) * 1e3)
            del res
        peak = None
        if spec["memory"]:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                res = call()
                torch.cuda.synchronize()
                peak = max(0, torch.cuda.max_memory_allocated() - before - _memory.tensor_bytes(res))
                del res
            elif _memory.peak_is_resettable():
                peak = _memory.extra_peak_bytes(call)
        out[name] = (statistics.median(times), None if peak is None else peak / 2**20)
    return out


def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def run(args) -> int:
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.rows, args.hidden, args.vocab, args.dtypes = [1024], [576], [49152], ["float32"]
    liger = args.device.startswith("cuda") and _liger_available()
    if not args.json:
        print("liger_kernel: " + ("timed as the anchor" if liger else
              "not timed (needs a CUDA device and the liger-kernel package)"), file=sys.stderr)
    rows = []
    env = {**os.environ, **__import__("klbelt.bench._memory", fromlist=["CHILD_ENV"]).CHILD_ENV}
    for function in args.functions:
        for n in args.rows:
            for hsize in args.hidden:
                for v in args.vocab:
                    for dtype in args.dtypes:
                        for pass_ in args.passes:
                            spec = {"function": function, "pass": pass_, "rows": n, "hidden": hsize, "vocab": v,
                                    "dtype": dtype, "device": args.device, "repeats": max(1, args.repeats),
                                    "memory": not args.no_memory, "liger": liger and function == "logprobs"}
                            proc = subprocess.run(
                                [sys.executable, "-m", "klbelt", "bench", "fused", "--child", json.dumps(spec)],
                                capture_output=True, text=True, env=env,
                            )
                            if proc.returncode != 0:
                                print(f"klbelt bench fused: {spec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                                return 1
                            res = json.loads(proc.stdout.strip().splitlines()[-1])
                            row = {
                                "function": function, "pass": pass_, "rows": n, "hidden": hsize, "vocab": v,
                                "dtype": dtype, "device": args.device,
                                "fused_ms": res["fused"][0], "unfused_ms": res["unfused"][0], "naive_ms": res["naive"][0],
                                "fused_extra_peak_mb": res["fused"][1], "unfused_extra_peak_mb": res["unfused"][1],
                                "naive_extra_peak_mb": res["naive"][1], "logits_mb": n * v * 4 / 2**20,
                            }
                            if "liger" in res:
                                row["liger_ms"], row["liger_extra_peak_mb"] = res["liger"]
                            rows.append(row)
                            if not args.json:
                                _print_row(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _print_row(row: dict) -> None:
    def mb(x):
        return "n/a" if x is None else f"{x:.0f}"

    print(
        f"{row['function']:8s} {row['pass']:16s} N={row['rows']} H={row['hidden']} V={row['vocab']} {row['dtype']:8s} "
        f"time ms fused {row['fused_ms']:.0f} / unfused {row['unfused_ms']:.0f} / naive {row['naive_ms']:.0f} "
        f"(fused/unfused {row['fused_ms'] / row['unfused_ms']:.2f}x); extra peak MB fused {mb(row['fused_extra_peak_mb'])} "
        f"/ unfused {mb(row['unfused_extra_peak_mb'])} / naive {mb(row['naive_extra_peak_mb'])}; logits {row['logits_mb']:.0f} MB",
        flush=True,
    )
