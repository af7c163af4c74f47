"""``klbelt bench kernels``: the fused log-prob and exact-KL kernels against the usual ways.

For ``[rows, vocab]`` logits in each dtype, and for the forward pass and the
forward+backward pass, it times

* ``logprobs_from_logits`` against ``torch.log_softmax(logits.float(), -1).gather(...)``
  and TRL's ``trl.trainer.utils.selective_log_softmax`` (left out without trl);
* ``kl_from_logits`` (reverse KL, policy || ref) against
  ``(p * (logp - logq)).sum(-1)`` on fp32 log-softmaxes and against
  ``F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)``;
* where klbelt runs its Triton kernels (CUDA), each also against itself with
  them off (``klbelt, torch kernels``: the path it falls back to).

Timing: one process; every implementation is called once at full size
(that call compiles, its time is reported as the compile warm-up) and
``--warmup`` more times untimed; then ``--repeats`` rounds call each
implementation once, the order rotating from round to round so drift hits all
alike; the median of the rounds is reported and ``speedup = baseline median /
klbelt median``. On CUDA (``--device cuda``) each call is timed with CUDA
events. For forward+backward only the policy logits require a gradient (the
reference is frozen, as in RLHF); the backward gets a fixed random ``[N]``
output gradient.

Floors, measured in the same run on the same tensors: ``read_ms`` is one read
of the policy logits (``logits.amax(-1)``), ``read_write_ms`` one read plus one
write of them (a copy into a preallocated tensor). A row's ``floor_ms`` is the
least memory traffic its work needs: log-probs forward one read; KL forward
two reads (policy and reference); log-probs forward+backward one read plus one
write (the logits in, their gradient out); KL forward+backward that plus one
read of the reference. ``over_floor = median_ms / floor_ms``. (A ratio to the
naive baseline says as much about the machine as about the kernel; the floor
is the same yardstick everywhere.)

Extra peak memory: on CPU measured in a separate process from resident memory
(see ``klbelt.bench._memory``); on CUDA from the allocator's peak in this
process (peak during the call minus allocated before it minus what it returns).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

DESCRIPTION = "time and extra peak memory of logprobs_from_logits / kl_from_logits vs naive and TRL/F.kl_div"

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
PASSES = ("forward", "forward+backward")
MEMORY_DEFINITION = (
    "extra peak MB = peak resident memory during one call (fresh process, inputs allocated and touched, "
    "one warm-up call done) minus the resident memory just before it, minus the tensors the call returns: "
    "the [N] result and, for forward+backward, the gradient w.r.t. the policy logits (their dtype)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=_positive, default=2048, help="logit rows N (positions) (default 2048)")
    parser.add_argument("--vocab", type=_positive, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument(
        "--dtypes",
        type=_dtypes,
        default=["fp32", "bf16"],
        help="comma-separated: fp32,bf16,fp16,fp64 (default fp32,bf16)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the logits live (default: cuda when available, else cpu)")
    parser.add_argument("--repeats", type=_positive, default=None, help="timed rounds per row (default 7 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=_non_negative, default=1, help="untimed calls after the first (default 1)")
    parser.add_argument(
        "--backend", choices=("auto", "compile", "eager"), default="auto", help="klbelt kernel backend (default auto)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON (a list of rows)")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _dtypes(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"dtypes must be a comma-separated subset of {','.join(DTYPES)}, got {text!r}")
    return names


# --------------------------------------------------------------------------- implementations
# Each takes (logits, ref_logits, tokens) -> [N] tensor.


def groups(torch_path: bool = False) -> list[dict]:
    """The benchmark's rows: for each klbelt function, its implementation and baselines (name -> fn).

    ``torch_path`` (CUDA, where klbelt runs Triton kernels): one more baseline per function, klbelt
    with the Triton kernels off (``klbelt.kl.set_triton(False)``): the torch kernels it falls back to.
    """
    import torch
    import torch.nn.functional as F

    from klbelt.kl import kl_from_logits, logprobs_from_logits

    from .fused import without_triton

    def naive_logprobs(x, y, t):
        return torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

    def naive_kl(x, y, t):
        logp = torch.log_softmax(x.float(), dim=-1)
        logq = torch.log_softmax(y.float(), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1)

    def kl_div(x, y, t):  # kl_div(input, target) = target * (log target - input): KL(policy || ref)
        logp = torch.log_softmax(x.float(), dim=-1)
        logq = torch.log_softmax(y.float(), dim=-1)
        return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)

    logprob_baselines = {"naive log_softmax+gather": naive_logprobs}
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # trl not installed (or broken): its row is left out
        pass
    else:
        logprob_baselines["trl selective_log_softmax"] = lambda x, y, t: selective_log_softmax(x, t)
    rows = [
        {
            "name": "logprobs_from_logits",
            "fn": lambda x, y, t: logprobs_from_logits(x, t),
            "baselines": logprob_baselines,
        },
        {
            "name": "kl_from_logits",
            "fn": lambda x, y, t: kl_from_logits(x, y),
            "baselines": {"naive (p*(logp-logq)).sum(-1)": naive_kl, "F.kl_div(log_target=True)": kl_div},
        },
    ]
    if torch_path:
        for row in rows:
            row["baselines"]["klbelt, torch kernels"] = without_triton(row["fn"])
    return rows


def make_inputs(rows: int, vocab: int, dtype_name: str, seed: int, device: str = "cpu"):
    """Policy logits, reference logits (policy + noise), uniform tokens and an output gradient."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, DTYPES[dtype_name])
    logits = (torch.randn(rows, vocab, generator=gen, device=device) * 2.0).to(dtype)
    ref_logits = (logits.float() + 0.5 * torch.randn(rows, vocab, generator=gen, device=device)).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    grad_out = torch.randn(rows, generator=gen, device=device)
    return logits, ref_logits, tokens, grad_out


def call(fn, inputs, pass_: str):
    """One call of ``fn`` for ``pass_``; returns the tensors it produced (result, and gradient)."""
    import torch

    logits, ref_logits, tokens, grad_out = inputs
    if pass_ == "forward":
        with torch.no_grad():
            return (fn(logits, ref_logits, tokens),)
    x = logits.detach().requires_grad_(True)
    out = fn(x, ref_logits, tokens)
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out.detach(), grad


# --------------------------------------------------------------------------- timing


def _time_once(fn, inputs, pass_: str) -> float:
    """Seconds of one call: CUDA events on a CUDA device, else the wall clock."""
    if inputs[0].is_cuda:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        outputs = call(fn, inputs, pass_)
        end.record()
        torch.cuda.synchronize()
        del outputs
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    outputs = call(fn, inputs, pass_)
    elapsed = time.perf_counter() - start
    del outputs
    return elapsed


def floors(inputs, repeats: int) -> dict[str, float]:
    """Median seconds of one read (``read``) and of one read plus one write (``read_write``) of the policy logits."""
    import torch

    logits = inputs[0]
    out = torch.empty_like(logits)
    impls = {"read": lambda x, y, t: x.amax(-1), "read_write": lambda x, y, t: out.copy_(x)}
    medians, _ = time_group(impls, inputs, "forward", repeats, 1)
    return medians


FLOOR_OF = {  # (reads of the policy logits, reads+writes of them, reads of the reference) per row
    ("logprobs_from_logits", "forward"): "read",
    ("logprobs_from_logits", "forward+backward"): "read_write",
    ("kl_from_logits", "forward"): "read + ref read",
    ("kl_from_logits", "forward+backward"): "read_write + ref read",
}


def floor_seconds(name: str, pass_: str, fl: dict[str, float]) -> float:
    """The row's floor from the measured ``read`` and ``read_write`` (the reference has the policy's size and dtype)."""
    base = fl["read" if pass_ == "forward" else "read_write"]
    return base + (fl["read"] if name == "kl_from_logits" else 0.0)


def cuda_extra_peak_bytes(fn, inputs, pass_: str) -> int:
    """Allocator peak of one call minus what was allocated before it and what it returns (CUDA)."""
    import torch

    from . import _memory

    call(fn, inputs, pass_)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outputs = call(fn, inputs, pass_)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before - _memory.tensor_bytes(outputs)
    del outputs
    return max(0, peak)


def time_group(impls: dict, inputs, pass_: str, repeats: int, warmup: int):
    """Median seconds per implementation over alternating rounds, and each one's first-call seconds."""
    gc.collect()
    first = {name: _time_once(fn, inputs, pass_) for name, fn in impls.items()}
    for _ in range(warmup):
        for fn in impls.values():
            _time_once(fn, inputs, pass_)
    names = list(impls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_time_once(impls[name], inputs, pass_))
    return {name: statistics.median(s) for name, s in samples.items()}, first


def measure_memory(spec: dict) -> dict:
    """Extra peak bytes for every (implementation, dtype, pass) of ``spec`` (run in the child process)."""
    from klbelt.kl import set_backend

    from . import _memory

    set_backend(spec["backend"])
    groups()  # import everything once, then
    gc.freeze()  # keep the imported objects out of the collections below (they are slow with trl loaded)
    results = {}
    if not _memory.peak_is_resettable():
        return results  # every extra peak is then reported as None
    for dtype_name in spec["dtypes"]:
        inputs = make_inputs(spec["rows"], spec["vocab"], dtype_name, spec["seed"])
        for group in groups():
            impls = {group["name"]: group["fn"], **group["baselines"]}
            for name, fn in impls.items():
                for pass_ in PASSES:
                    key = f"{name}|{dtype_name}|{pass_}"
                    results[key] = _memory.extra_peak_bytes(lambda fn=fn, x=inputs, p=pass_: call(fn, x, p))
        del inputs
        gc.collect()
    gc.unfreeze()
    return results


# --------------------------------------------------------------------------- command


def run(args) -> int:
    import torch

    from klbelt.kl import _kernels, get_backend, set_backend

    from . import _memory

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("klbelt bench kernels: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 7
    groups()  # import everything once, then
    gc.freeze()  # keep the imported objects out of later collections (they are slow with trl loaded)
    previous = get_backend()
    set_backend(args.backend)
    try:
        rows, first_calls = _run_timings(args, torch, _kernels)
    finally:
        set_backend(previous)
    memory = {}
    if not args.no_memory and args.device == "cuda":
        memory = {k: v for r in rows for k, v in r.pop("_cuda_memory").items()}
    elif not args.no_memory:
        spec = {k: getattr(args, k) for k in ("rows", "vocab", "dtypes", "seed", "backend")}
        memory = _memory.measure_in_child(spec, "klbelt.bench.kernels:measure_memory")
    for row in rows:
        row.pop("_cuda_memory", None)
        for key, field in (("name", "extra_peak_mb"), ("baseline", "baseline_extra_peak_mb")):
            value = memory.get(f"{row[key]}|{row['dtype']}|{row['pass']}")
            row[field] = None if value is None else round(value / 2**20, 2)
    gc.unfreeze()  # frozen objects outlive shutdown; nanobind (Triton's bindings) would report them as leaks
    compile_s = sum(first_calls.values())
    if args.json:
        print(json.dumps(rows, indent=1))
        print(f"compile warm-up: {compile_s:.1f} s (klbelt's first calls, excluded from the timings)", file=sys.stderr)
    else:
        _print_table(args, rows, compile_s, torch)
    return 0


def _run_timings(args, torch, _kernels):
    rows = []
    first_calls = {}
    from klbelt.kl import _triton

    compiled = _kernels._want_compile(args.rows * args.vocab)
    for dtype_name in args.dtypes:
        inputs = make_inputs(args.rows, args.vocab, dtype_name, args.seed, args.device)
        triton = _triton.wanted(inputs[0])
        logits_mb = inputs[0].numel() * inputs[0].element_size() / 2**20
        for group in groups(torch_path=triton):
            impls = {group["name"]: group["fn"], **group["baselines"]}
            for pass_ in PASSES:
                medians, first = time_group(impls, inputs, pass_, args.repeats, args.warmup)
                fl = floors(inputs, args.repeats)  # in the same run, right after the row's timings
                floor = floor_seconds(group["name"], pass_, fl)
                first_calls[(group["name"], dtype_name, pass_)] = first[group["name"]]
                cuda_memory = {}
                if args.device == "cuda" and not args.no_memory:
                    cuda_memory = {f"{name}|{dtype_name}|{pass_}": cuda_extra_peak_bytes(fn, inputs, pass_)
                                   for name, fn in impls.items()}
                for baseline in group["baselines"]:
                    rows.append(
                        {
                            "name": group["name"],
                            "baseline": baseline,
                            "dtype": dtype_name,
                            "pass": pass_,
                            "median_ms": round(medians[group["name"]] * 1e3, 4),
                            "baseline_median_ms": round(medians[baseline] * 1e3, 4),
                            "speedup": round(medians[baseline] / medians[group["name"]], 3),
                            "read_ms": round(fl["read"] * 1e3, 4),
                            "read_write_ms": round(fl["read_write"] * 1e3, 4),
                            "floor": FLOOR_OF[(group["name"], pass_)],
                            "floor_ms": round(floor * 1e3, 4),
                            "over_floor": round(medians[group["name"]] / floor, 3),
                            "device": args.device,
                            # after the row's timings: a kernel that failed in them was given up
                            "triton": triton and _triton.failure() is None,
                            "first_call_s": round(first[group["name"]], 3),
                            "rows": args.rows,
                            "vocab": args.vocab,
                            "logits_mb": round(logits_mb, 2),
                            "repeats": args.repeats,
                            "backend": args.backend,
                            "compiled": compiled,
                            "threads": torch.get_num_threads(),
                            "_cuda_memory": cuda_memory,
                        }
                    )
        del inputs
        gc.collect()
    return rows, first_calls


def _print_table(args, rows, compile_s, torch) -> None:
    compiled = rows[0]["compiled"] if rows else False
    triton = rows[0]["triton"] if rows else False
    where = (f"{torch.cuda.get_device_name()}, Triton kernels: {'yes' if triton else 'no'}" if args.device == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(
        f"klbelt bench kernels: {args.rows} x {args.vocab} logits on {args.device}, backend {args.backend} "
        f"({'compiled' if compiled else 'eager'}), torch {torch.__version__}, {where}, "
        f"median of {args.repeats} alternating rounds"
    )
    if compiled:
        print(f"compile warm-up: {compile_s:.1f} s (klbelt's first calls per function, dtype and pass; not timed)")
    header = ("function", "baseline", "dtype", "pass", "ms", "floor ms", "x floor", "base ms", "speedup",
              "extra MB", "base extra MB")
    table = [header]
    for r in rows:
        table.append(
            (
                r["name"],
                r["baseline"],
                r["dtype"],
                r["pass"],
                f"{r['median_ms']:.3f}",
                f"{r['floor_ms']:.3f}",
                f"{r['over_floor']:.2f}x",
                f"{r['baseline_median_ms']:.3f}",
                f"{r['speedup']:.2f}x",
                "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}",
                "-" if r["baseline_extra_peak_mb"] is None else f"{r['baseline_extra_peak_mb']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    print("floor ms: one read of the logits (forward; KL: + one read of the reference), one read + one write "
          "(forward+backward; KL: + one read of the reference), timed beside each row (read_ms, read_write_ms in --json)")
    if not args.no_memory:
        sizes = sorted({(r["dtype"], r["logits_mb"]) for r in rows})
        print(MEMORY_DEFINITION + ".")
        print("logits tensor: " + ", ".join(f"{d} {mb:.1f} MB (1/8 = {mb / 8:.1f} MB)" for d, mb in sizes))
