"""``klbelt bench fused``: log-probs and exact KL from hidden states, with and without the logits.

Three implementations per function (four on CUDA), timed and memory-measured on the same inputs
(``hidden [N, H]``, LM-head ``weight [V, H]``):

* ``naive``: ``z = hidden @ weight.T``, ``log_softmax(z.float())``, gather (or the KL from two log-softmaxes);
* ``unfused``: the same matmul, then klbelt's logits kernel (``logprobs_from_logits`` / ``kl_from_logits``);
* ``fused``: ``logprobs_from_hidden`` / ``kl_from_hidden`` (no ``[N, V]`` tensor);
* ``fused_torch`` (CUDA, where ``fused`` runs klbelt's Triton kernels): the same
  with them off (``klbelt.kl.set_triton(False)``), the torch kernels' blocked head.

On a CUDA device, for the log-probs, the other fused heads are timed when
installed: Liger-Kernel's fused linear cross-entropy (``-logprob`` summed; its
backward takes a scalar gradient only) as ``liger_ms``, and Apple's Cut
Cross-Entropy per token (``linear_cross_entropy(..., reduction="none")``) in
its default mode, which skips gradient entries below bf16 resolution
(``cce_ms``), and exact (``filter_eps=None``, ``cce_exact_ms``).

Floors, measured in the same process on the same inputs: ``matmul_ms`` is one
``hidden @ weight.T`` (the forward's floor; forward+backward needs three such
matmuls), ``read_ms`` one read of the ``[N, V]`` logits in the input dtype
(``amax``). ``fused_over_matmul`` is ``fused_ms / matmul_ms`` for the forward
and ``fused_ms / (3 * matmul_ms)`` for forward+backward. The backward gets a
fixed random per-token output gradient (as a loss weighted per token would).
Extra peak memory is defined as in ``klbelt bench kernels`` (``_memory``: peak
resident memory of one call minus what it returns, in a fresh process per
configuration; on CUDA the allocator's peak, reset per call, so there every
configuration runs in this process unless ``--no-in-process``), and taken on the
first timed call. ``logits_mb`` is the size of the fp32 ``[N, V]`` logits, the
yardstick of the targets (extra peak <= 1/8 of it). ``--head-backward bounded``
runs the Triton head's bf16/fp16 backward in two passes
(``klbelt.kl._triton.set_head_backward``: scratch bounded by ~8 MB instead of
``4 N H`` bytes, one more recompute of the logits); ``auto`` (the default, the
library's) is one-pass where its scratch fits 12 MiB; ``one-pass,bounded`` times
both, the second on the fused head's forward+backward only; every row says which
was asked (``head_backward``) and which ran (``head_backward_used``; null where the
Triton kernels did not run, ``triton`` false).

Each implementation is called once at full size to warm up (compilation,
thread pools, autotuning), then timed ``--repeats`` times (median reported;
CUDA events on a CUDA device). On a CPU only, cells whose matmul is at
least ``--big-gflop`` GFLOP, where one call takes minutes on 2 CPU cores, are
warmed up on their first ``WARMUP_ROWS`` rows only (the kernels are compiled
for dynamic shapes) and timed ``--big-repeats`` times; their extra peak then
also holds buffers a library allocates on first use at full size (~20 MB). Every row says its
``repeats``. With ``--json`` the human-readable table goes to stderr, so
``--json > cells.json 2> cells.txt`` keeps both.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

WARMUP_ROWS = 512

DESCRIPTION = "time and extra peak memory of log-probs / exact KL from hidden states: naive, matmul + kernel, fused"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _ints1(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive int, got {text!r}")
    return values[0]


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
    parser.add_argument("--impls", type=_names(IMPLS), default=None,
                        help="implementations to measure (default naive,unfused,fused, and fused_torch on CUDA: the "
                             "fused head with klbelt's Triton kernels off); a missing one reports null")
    parser.add_argument("--quick", action="store_true",
                        help="one small configuration: N=1024, H=576, V=49152, float32 (about a minute on 2 CPU cores)")
    parser.add_argument("--repeats", type=_ints1, default=None,
                        help="timed calls per implementation; the median is reported (default 3 on CPU, 10 on CUDA)")
    parser.add_argument("--big-repeats", type=_ints1, default=1,
                        help="CPU only: timed calls for cells whose matmul is at least --big-gflop GFLOP (default 1)")
    parser.add_argument("--big-gflop", type=float, default=1000.0,
                        help="CPU only: matmul size (2 N H V / 1e9) from which --big-repeats and the "
                             f"{WARMUP_ROWS}-row warm-up apply (default 1000)")
    parser.add_argument("--head-backward", type=_names(("auto", "one-pass", "bounded")), default=["auto"],
                        help="the Triton head's bf16/fp16 backward (CUDA), comma-separated to time several: one "
                             "recompute of the logits and an fp32 [N, H] accumulator, two recomputes and at most "
                             "~8 MB of scratch, or auto (the library's default: one-pass where its scratch fits "
                             "12 MiB); modes after the first time the fused head's forward+backward only "
                             "(default auto)")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurement")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="measure every configuration in this process (default on CUDA, where the allocator's "
                             "peak is reset per call; on a CPU the resident peak needs a fresh process per "
                             "configuration, so there it needs --no-memory)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON (a list of rows)")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def other_heads(with_liger: bool, with_cce: bool) -> dict:
    """The other fused LM heads for log-probs: ``name -> fn(hidden, weight, tokens)``.

    ``liger``: Liger-Kernel's fused linear cross-entropy, summed (``[1]``, minus the summed
    log-probs: its backward takes a scalar gradient only); ``cce`` / ``cce_exact``: Cut
    Cross-Entropy per token (``[N]`` log-probs), in its default mode (gradient entries below
    bf16 resolution skipped) and with ``filter_eps=None``. Each needs its package and a CUDA device.
    A package that fails to import gives heads that raise its error when called (reported, not fatal).
    """
    heads = {}
    if with_liger:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            heads["liger"] = lambda h, w, t: -loss(w, h, t).reshape(1)
        except Exception as exc:
            heads["liger"] = _unavailable("liger_kernel", exc)
    if with_cce:
        try:
            from cut_cross_entropy import linear_cross_entropy

            heads["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
            heads["cce_exact"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", filter_eps=None)
        except Exception as exc:
            heads["cce"] = heads["cce_exact"] = _unavailable("cut_cross_entropy", exc)
    return heads


def _unavailable(package: str, exc: Exception):
    def head(h, w, t):
        raise RuntimeError(f"{package} failed to import: {type(exc).__name__}: {exc}")
    return head


IMPLS = ("naive", "unfused", "fused", "fused_torch")


def without_triton(fn):
    """``fn`` with klbelt's Triton kernels off (``set_triton(False)``): the torch kernels they fall back
    to. The autograd function is chosen in the forward, so its backward follows. (``bench kernels``'
    ``klbelt, torch kernels`` baseline too.)"""
    from klbelt.kl import set_triton

    def call(*args):
        old = set_triton(False)
        try:
            return fn(*args)
        finally:
            set_triton(old)
    return call


def _impls(function: str, torch, with_liger: bool, with_cce: bool = False):
    from klbelt.kl import kl_from_hidden, kl_from_logits, logprobs_from_hidden, logprobs_from_logits

    if function == "logprobs":
        impls = {
            "naive": lambda h, w, t, rh, rw: torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1),
            "unfused": lambda h, w, t, rh, rw: logprobs_from_logits(h @ w.T, t),
            "fused": lambda h, w, t, rh, rw: logprobs_from_hidden(h, w, t),
        }
        impls["fused_torch"] = without_triton(impls["fused"])
        for name, head in other_heads(with_liger, with_cce).items():
            impls[name] = lambda h, w, t, rh, rw, head=head: head(h, w, t)
        return impls

    def naive_kl(h, w, t, rh, rw):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        logq = torch.log_softmax((rh @ rw.T).float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1)

    impls = {
        "naive": naive_kl,
        "unfused": lambda h, w, t, rh, rw: kl_from_logits(h @ w.T, rh @ rw.T),
        "fused": lambda h, w, t, rh, rw: kl_from_hidden(h, w, rh, rw),
    }
    impls["fused_torch"] = without_triton(impls["fused"])
    return impls


def _child(spec: dict) -> dict:
    """One configuration in this (fresh) process: every implementation's median time and extra peak."""
    import torch

    from klbelt.kl import _triton

    from . import _memory

    _triton.set_head_backward(spec.get("head_backward", "auto"))
    torch.manual_seed(0)
    n, hsize, v, device = spec["rows"], spec["hidden"], spec["vocab"], spec["device"]
    dtype = getattr(torch, spec["dtype"])
    backward = spec["pass"] == "forward+backward"
    h = (torch.randn(n, hsize, device=device) * 0.5).to(dtype).requires_grad_(backward)
    w = (torch.randn(v, hsize, device=device) / hsize**0.5).to(dtype).requires_grad_(backward)
    rh = (h.detach() + 0.1 * torch.randn_like(h, dtype=torch.float32).to(dtype)).contiguous()
    rw = w.detach().clone()
    t = torch.randint(0, v, (n,), device=device)
    g = torch.randn(n, device=device)  # per-token output gradient
    cuda = device.startswith("cuda")
    with_liger = cuda and spec.get("liger", False)
    with_cce = cuda and spec.get("cce", False)
    out = {}
    rss_peak = not cuda and spec["memory"] and _memory.peak_is_resettable()
    warm = min(n, WARMUP_ROWS) if spec.get("big") else n
    for name, fn in _impls(spec["function"], torch, with_liger, with_cce).items():
        if name in IMPLS and name not in spec["impls"]:
            continue
        def call(rows=n, fn=fn):
            hs, ts, rhs = (h, t, rh) if rows == n else (h[:rows], t[:rows], rh[:rows])
            res = fn(hs, w, ts, rhs, rw)
            if backward:
                weight = g[: res.shape[0]].to(res.dtype) if res.shape[0] == hs.shape[0] else torch.ones_like(res)
                return (res.detach(), *torch.autograd.grad(res, [h, w], weight))
            return (res,)

        if name not in IMPLS:  # another library's head: its failure is reported, not fatal
            try:
                call(warm)
            except Exception as exc:
                out[name], out[f"{name}_error"] = (None, None), f"{type(exc).__name__}: {exc}"[:300]
                continue
        else:
            call(warm)  # warm-up: compilation (dynamic shapes), thread pools, lazily loaded code
        times, peak = [], None
        for i in range(spec["repeats"]):
            measure = i == 0 and spec["memory"]
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                if measure:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
            elif measure and rss_peak:
                _memory.reset_peak()
                before = _memory._status_kib("VmRSS")
            times.append(_timed_ms(call, cuda, torch))
            res = _timed_ms.result
            if measure and cuda:
                peak = max(0, torch.cuda.max_memory_allocated() - before - _memory.tensor_bytes(res))
            elif measure and rss_peak:
                peak = max(0, (_memory._status_kib("VmHWM") - before) * 1024 - _memory.tensor_bytes(res))
            del res
        out[name] = (statistics.median(times), None if peak is None else peak / 2**20)
    out.update(_floors(h.detach(), w.detach(), spec["repeats"], cuda, torch))
    # whether "fused" ran the Triton kernels (after the timings: a kernel that failed is given up), and
    # which backward the Triton head ran (the reference is frozen: its side needs no gradient)
    out["triton"], out["triton_failure"] = _triton.wanted(h, w), _triton.failure()
    out["head_backward_used"] = _triton.head_backward_mode(n, hsize, v, dtype, need_w=backward) if out["triton"] else None
    return out


def _timed_ms(call, cuda: bool, torch) -> float:
    """Milliseconds of ``call()`` (CUDA events on CUDA); its result is left in ``_timed_ms.result``."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _timed_ms.result = call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    _timed_ms.result = call()
    return (time.perf_counter() - start) * 1e3


def _floors(h, w, repeats: int, cuda: bool, torch) -> dict:
    """Median ms of one ``h @ w.T`` and of one read of its ``[N, V]`` result (``amax``), after a warm-up each."""
    with torch.no_grad():
        z = h @ w.T
        res = {}
        for name, fn in (("matmul", lambda: h @ w.T), ("read", lambda z=z: z.amax(-1))):
            fn()
            res[name] = (statistics.median(_timed_ms(fn, cuda, torch) for _ in range(repeats)), None)
            _timed_ms.result = None
        del z, fn  # the read's lambda holds the logits too
    return res


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(args) -> int:
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.rows, args.hidden, args.vocab, args.dtypes = [1024], [576], [49152], ["float32"]
    cuda = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 10 if cuda else 3
    if args.in_process is None:
        args.in_process = cuda
    if args.impls is None:  # on a CPU the fused head is the torch path already
        args.impls = list(IMPLS) if cuda else ["naive", "unfused", "fused"]
    if args.in_process and not cuda and not args.no_memory:
        print("klbelt bench fused: --in-process on a CPU needs --no-memory (the resident peak of one configuration "
              "is measured in a fresh process)", file=sys.stderr)
        return 2
    liger, cce = cuda and _installed("liger_kernel"), cuda and _installed("cut_cross_entropy")
    if not args.json:
        for what, on, package in (("liger_kernel", liger, "liger-kernel"), ("cut_cross_entropy", cce, "cut-cross-entropy")):
            print(f"{what}: " + ("timed" if on else f"not timed (needs a CUDA device and the {package} package)"),
                  file=sys.stderr)
    rows = []
    env = {**os.environ, **__import__("klbelt.bench._memory", fromlist=["CHILD_ENV"]).CHILD_ENV}
    grid = itertools.product(args.functions, args.rows, args.hidden, args.vocab, args.dtypes, args.passes)
    for function, n, hsize, v, dtype, pass_ in grid:
        # the backward mode changes the forward+backward of the fused head only: later modes time just that
        modes = args.head_backward if pass_ != "forward" else args.head_backward[:1]
        for i, mode in enumerate(modes):
            impls = args.impls if i == 0 else [x for x in args.impls if x == "fused"]
            if not impls:
                continue
            spec = {"function": function, "pass": pass_, "rows": n, "hidden": hsize, "vocab": v,
                    "dtype": dtype, "device": args.device,
                    "big": not cuda and 2 * n * hsize * v / 1e9 >= args.big_gflop,
                    "memory": not args.no_memory, "liger": liger and function == "logprobs" and i == 0,
                    "cce": cce and function == "logprobs" and i == 0, "impls": impls, "head_backward": mode}
            spec["repeats"] = args.big_repeats if spec["big"] else args.repeats
            res = _measure(spec, args.in_process, env)
            if res is None:
                return 1
            rows.append(_row(spec, res))
            _print_row(rows[-1], sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _row(spec: dict, res: dict) -> dict:
    """The JSON row of one configuration from ``_child``'s ``name -> (ms, extra peak MB)``."""
    none = (None, None)
    n, v = spec["rows"], spec["vocab"]
    row = {key: spec[key] for key in ("function", "pass", "rows", "hidden", "vocab", "dtype", "device", "head_backward")}
    row.update({
        "fused_ms": res.get("fused", none)[0], "unfused_ms": res.get("unfused", none)[0],
        "naive_ms": res.get("naive", none)[0], "fused_extra_peak_mb": res.get("fused", none)[1],
        "unfused_extra_peak_mb": res.get("unfused", none)[1],
        "naive_extra_peak_mb": res.get("naive", none)[1], "logits_mb": n * v * 4 / 2**20,
        "fused_torch_ms": res.get("fused_torch", none)[0], "fused_torch_extra_peak_mb": res.get("fused_torch", none)[1],
        "repeats": spec["repeats"], "matmul_ms": res["matmul"][0], "read_ms": res["read"][0],
        "head_backward_used": res.get("head_backward_used"),
        "triton": res.get("triton"), "triton_failure": res.get("triton_failure"),
    })
    matmuls = 1 if spec["pass"] == "forward" else 3
    row["fused_over_matmul"] = None if row["fused_ms"] is None else row["fused_ms"] / (matmuls * row["matmul_ms"])
    for other in ("liger", "cce", "cce_exact"):
        if other in res:
            row[f"{other}_ms"], row[f"{other}_extra_peak_mb"] = res[other]
        if f"{other}_error" in res:
            row[f"{other}_error"] = res[f"{other}_error"]
    return row


def _measure(spec: dict, in_process: bool, env: dict) -> dict | None:
    """``_child(spec)``, here or in a fresh process; None (the error printed) when it fails."""
    if in_process:
        from klbelt.kl import _triton

        mode = _triton.set_head_backward(spec["head_backward"])
        try:
            return _child(spec)
        except Exception as exc:
            print(f"klbelt bench fused: {spec} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        finally:
            _triton.set_head_backward(mode)
            gc.collect()
            if spec["device"].startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
    proc = subprocess.run([sys.executable, "-m", "klbelt", "bench", "fused", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"klbelt bench fused: {spec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_row(row: dict, file) -> None:
    def mb(x):
        return "n/a" if x is None else f"{x:.0f}"

    def ms(x):
        return "n/a" if x is None else f"{x:.4g}"

    def ratio(a, b):
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    print(
        f"{row['function']:8s} {row['pass']:16s} N={row['rows']} H={row['hidden']} V={row['vocab']} {row['dtype']:8s} "
        f"time ms fused {ms(row['fused_ms'])} / unfused {ms(row['unfused_ms'])} / naive {ms(row['naive_ms'])} "
        f"(fused/unfused {ratio(row['fused_ms'], row['unfused_ms'])}); extra peak MB fused {mb(row['fused_extra_peak_mb'])} "
        f"/ unfused {mb(row['unfused_extra_peak_mb'])} / naive {mb(row['naive_extra_peak_mb'])}; logits {row['logits_mb']:.0f} MB"
        f"; floors: matmul {ms(row['matmul_ms'])} ms (fused/{'' if row['pass'] == 'forward' else '3x '}matmul "
        f"{'n/a' if row['fused_over_matmul'] is None else format(row['fused_over_matmul'], '.2f')}x), "
        f"read of the logits {ms(row['read_ms'])} ms"
        + (f"; fused with the torch kernels {ms(row['fused_torch_ms'])} ms / {mb(row['fused_torch_extra_peak_mb'])} MB"
           if row.get("fused_torch_ms") is not None else "")
        + "".join(f"; {o} {ms(row[o + '_ms'])} ms / {mb(row[o + '_extra_peak_mb'])} MB"
                  + (f" (failed: {row[o + '_error']})" if o + "_error" in row else "")
                  for o in ("liger", "cce", "cce_exact") if o + "_ms" in row)
        + f" (median of {row['repeats']}; head backward {row['head_backward']}"
        + ("" if row["head_backward_used"] in (None, row["head_backward"]) else f": {row['head_backward_used']}") + ")",
        file=file, flush=True,
    )
