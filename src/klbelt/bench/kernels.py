"""``klbelt bench kernels``: the fused log-prob and exact-KL kernels against the usual ways.

For ``[rows, vocab]`` logits in each dtype, and for the forward pass and the
forward+backward pass, it times

* ``logprobs_from_logits`` against ``torch.log_softmax(logits.float(), -1).gather(...)``
  and TRL's ``trl.trainer.utils.selective_log_softmax`` (left out without trl);
* ``kl_from_logits`` (reverse KL, policy || ref) against
  ``(p * (logp - logq)).sum(-1)`` on fp32 log-softmaxes and against
  ``F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)``.

Timing: one process; every implementation is called once (that call
compiles, its time is reported as the compile warm-up) and ``--warmup`` more
times untimed; then ``--repeats`` rounds call each implementation once, the
order rotating from round to round so drift hits all alike; the median of the
rounds is reported and ``speedup = baseline median / klbelt median``. For
forward+backward only the policy logits require a gradient (the reference is
frozen, as in RLHF); the backward gets a fixed random ``[N]`` output gradient.
Extra peak memory is measured in a separate process (see ``klbelt.bench._memory``).
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
    parser.add_argument("--repeats", type=_positive, default=7, help="timed rounds per row (default 7)")
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


def groups() -> list[dict]:
    """The benchmark's rows: for each klbelt function, its implementation and baselines (name -> fn)."""
    import torch
    import torch.nn.functional as F

    from klbelt.kl import kl_from_logits, logprobs_from_logits

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
    return [
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


def make_inputs(rows: int, vocab: int, dtype_name: str, seed: int):
    """Policy logits, reference logits (policy + noise), uniform tokens and an output gradient."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, DTYPES[dtype_name])
    logits = (torch.randn(rows, vocab, generator=gen) * 2.0).to(dtype)
    ref_logits = (logits.float() + 0.5 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    grad_out = torch.randn(rows, generator=gen)
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
    start = time.perf_counter()
    outputs = call(fn, inputs, pass_)
    elapsed = time.perf_counter() - start
    del outputs
    return elapsed


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
                    results[key] = _memory.extra_peak_bytes(lambda: call(fn, inputs, pass_))
        del inputs
        gc.collect()
    return results


# --------------------------------------------------------------------------- command


def run(args) -> int:
    import torch

    from klbelt.kl import _kernels, get_backend, set_backend

    from . import _memory

    groups()  # import everything once, then
    gc.freeze()  # keep the imported objects out of later collections (they are slow with trl loaded)
    previous = get_backend()
    set_backend(args.backend)
    try:
        rows, first_calls = _run_timings(args, torch, _kernels)
    finally:
        set_backend(previous)
    memory = {}
    if not args.no_memory:
        spec = {k: getattr(args, k) for k in ("rows", "vocab", "dtypes", "seed", "backend")}
        memory = _memory.measure_in_child(spec, "klbelt.bench.kernels:measure_memory")
    for row in rows:
        for key, field in (("name", "extra_peak_mb"), ("baseline", "baseline_extra_peak_mb")):
            value = memory.get(f"{row[key]}|{row['dtype']}|{row['pass']}")
            row[field] = None if value is None else round(value / 2**20, 2)
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
    compiled = _kernels._want_compile(args.rows * args.vocab)
    for dtype_name in args.dtypes:
        inputs = make_inputs(args.rows, args.vocab, dtype_name, args.seed)
        logits_mb = inputs[0].numel() * inputs[0].element_size() / 2**20
        for group in groups():
            impls = {group["name"]: group["fn"], **group["baselines"]}
            for pass_ in PASSES:
                medians, first = time_group(impls, inputs, pass_, args.repeats, args.warmup)
                first_calls[(group["name"], dtype_name, pass_)] = first[group["name"]]
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
                            "first_call_s": round(first[group["name"]], 3),
                            "rows": args.rows,
                            "vocab": args.vocab,
                            "logits_mb": round(logits_mb, 2),
                            "repeats": args.repeats,
                            "backend": args.backend,
                            "compiled": compiled,
                            "threads": torch.get_num_threads(),
                        }
                    )
        del inputs
        gc.collect()
    return rows, first_calls


def _print_table(args, rows, compile_s, torch) -> None:
    compiled = rows[0]["compiled"] if rows else False
    print(
        f"klbelt bench kernels: {args.rows} x {args.vocab} logits, backend {args.backend} "
        f"({'compiled' if compiled else 'eager'}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} alternating rounds"
    )
    if compiled:
        print(f"compile warm-up: {compile_s:.1f} s (klbelt's first calls per function, dtype and pass; not timed)")
    header = ("function", "baseline", "dtype", "pass", "ms", "base ms", "speedup", "extra MB", "base extra MB")
    table = [header]
    for r in rows:
        table.append(
            (
                r["name"],
                r["baseline"],
                r["dtype"],
                r["pass"],
                f"{r['median_ms']:.1f}",
                f"{r['baseline_median_ms']:.1f}",
                f"{r['speedup']:.2f}x",
                "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}",
                "-" if r["baseline_extra_peak_mb"] is None else f"{r['baseline_extra_peak_mb']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    if not args.no_memory:
        sizes = sorted({(r["dtype"], r["logits_mb"]) for r in rows})
        print(MEMORY_DEFINITION + ".")
        print("logits tensor: " + ", ".join(f"{d} {mb:.1f} MB (1/8 = {mb / 8:.1f} MB)" for d, mb in sizes))
