"""The kernel part of the GPU check: correctness against float64 at full size, both kernel benches, one table.

    python -m klbelt.bench.gpu_check_kernels                 # CUDA: 4096 x 151936 logits, the four head shapes
    python -m klbelt.bench.gpu_check_kernels --device cpu --tiny   # Triton's interpreter on CPU tensors, tiny shapes

1. Correctness: ``logprobs_from_logits``, ``kl_from_logits``, ``logprobs_from_hidden`` and
   ``kl_from_hidden`` (fp32 and bf16 inputs) against float64 autograd on the same input
   values, forward and backward (per-token output gradient); the float64 reference is
   computed in row chunks. Each row names the path that ran (``triton`` or ``torch``).
2. ``klbelt bench kernels --device DEV`` at the logits shape and ``klbelt bench fused
   --device DEV`` at each head shape (bf16), in their own processes, each with its floors
   measured in the same run; the table checks the issue's targets against them.

On CPU (``--device cpu``) it sets ``TRITON_INTERPRET=1`` and ``KLBELT_TRITON_CPU=1`` so the
Triton kernels run in the interpreter; its timings then say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOGITS_SHAPE = (4096, 151936)
HEAD_SHAPES = [(4096, 2048, 151936), (8192, 896, 151936), (8192, 4096, 128256), (16384, 4096, 128256)]
TINY_LOGITS = (40, 200)
TINY_HEADS = [(40, 16, 100)]
CHUNK_ROWS = 256  # rows per chunk of the float64 reference

# Tolerances against float64. Forward: log-probs max abs error (nats); KL max error relative to the largest
# KL (for nearly equal distributions fp32 rounding of the logits alone gives ~5e-5 of a KL of ~5e-3).
# Gradient: relative (2-norm) error; bf16 inputs get bf16 gradients, one rounding (2^-9 relative) each.
FORWARD_TOLERANCE = {"max abs": 2e-5, "max rel": 1e-4}
GRADIENT_TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}
TARGETS = {  # the targets on an H200, bf16
    "logits forward": 1.3, "logits forward+backward": 1.3,
    "head forward": 1.15, "head forward+backward": 1.35, "head extra peak MB": 16.0,
}


def _ref_chunks(n: int):
    for s in range(0, n, CHUNK_ROWS):
        yield slice(s, min(s + CHUNK_ROWS, n))


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def _check_logits(torch, device, n, v, dtype):
    from klbelt.kl import _triton, kl_from_logits, logprobs_from_logits

    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, v, generator=gen, device=device) * 3).to(dtype)
    y = (x.float() + torch.randn(n, v, generator=gen, device=device)).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen, device=device)
    g = torch.randn(n, generator=gen, device=device, dtype=torch.float64)
    path = "triton" if _triton.wanted(x) else "torch"
    rows = []
    for name, f, f64 in (
        ("logprobs_from_logits", lambda a: logprobs_from_logits(a, t),
         lambda a, s: torch.log_softmax(a, -1).gather(-1, t[s, None])[:, 0]),
        ("kl_from_logits", lambda a: kl_from_logits(a, y),
         lambda a, s: _kl64(torch, a, y[s].double())),
    ):
        xr = x.detach().requires_grad_(True)
        out = f(xr)
        (grad,) = torch.autograd.grad(out, xr, g.to(out.dtype))
        out = out.detach()
        fwd_err = grad_err_num = grad_norm = 0.0
        ref_scale = 0.0
        for s in _ref_chunks(n):
            a = x[s].double().requires_grad_(True)
            ref = f64(a, s)
            (ref_g,) = torch.autograd.grad(ref, a, g[s])
            fwd_err = max(fwd_err, float((out[s].double() - ref.detach()).abs().max()))
            ref_scale = max(ref_scale, float(ref.detach().abs().max()))
            grad_err_num += float(((grad[s].double() - ref_g) ** 2).sum())
            grad_norm += float((ref_g**2).sum())
        if name == "kl_from_logits":
            fwd_err /= max(ref_scale, 1e-300)  # relative to the largest KL
        rows.append(_row(name, (n, v), dtype, path, fwd_err, (grad_err_num / grad_norm) ** 0.5,
                         "max abs" if name == "logprobs_from_logits" else "max rel"))
        del out, grad
    return rows


def _kl64(torch, a, b):
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _check_head(torch, device, n, hsize, v, dtype, others=None):
    from klbelt.kl import _triton, kl_from_hidden, logprobs_from_hidden

    gen = torch.Generator(device=device).manual_seed(1)
    h = (torch.randn(n, hsize, generator=gen, device=device) * 0.5).to(dtype)
    w = (torch.randn(v, hsize, generator=gen, device=device) / hsize**0.5).to(dtype)
    rh = (h.float() + 0.1 * torch.randn(n, hsize, generator=gen, device=device)).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen, device=device)
    g = torch.randn(n, generator=gen, device=device, dtype=torch.float64)
    path = "triton" if _triton.wanted(h, w) else "torch"
    w64 = w.double()
    rows = []
    for name, f, f64 in (
        ("logprobs_from_hidden", lambda hh, ww: logprobs_from_hidden(hh, ww, t),
         lambda hh, ww, s: torch.log_softmax(hh @ ww.T, -1).gather(-1, t[s, None])[:, 0]),
        ("kl_from_hidden", lambda hh, ww: kl_from_hidden(hh, ww, rh, w),
         lambda hh, ww, s: _kl64(torch, hh @ ww.T, rh[s].double() @ w64.T)),
    ):
        hr, wr = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = f(hr, wr)
        gh, gw = torch.autograd.grad(out, (hr, wr), g.to(out.dtype))
        out = out.detach()
        ref_out = torch.empty(n, dtype=torch.float64, device=device)
        ref_gh = torch.empty(n, hsize, dtype=torch.float64, device=device)
        wd = w64.clone().requires_grad_(True)
        for s in _ref_chunks(n):
            hd = h[s].double().requires_grad_(True)
            ref = f64(hd, wd, s)
            ref.backward(g[s])  # wd.grad accumulates over the chunks
            ref_out[s] = ref.detach()
            ref_gh[s] = hd.grad
        fwd_err = float((out.double() - ref_out).abs().max())
        if name == "kl_from_hidden":
            fwd_err /= max(float(ref_out.abs().max()), 1e-300)
        grad_err = max(_rel(gh, ref_gh), _rel(gw, wd.grad))
        rows.append(_row(name, (n, hsize, v), dtype, path, fwd_err, grad_err,
                         "max abs" if name == "logprobs_from_hidden" else "max rel"))
        if name == "logprobs_from_hidden" and others:
            rows += _check_others(torch, others, h, w, t, g, (ref_out, ref_gh, wd.grad), dtype)
        del out, gh, gw, wd, ref_gh
    return rows


def _check_others(torch, others, h, w, t, g, ref, dtype):
    """Rows for the other fused heads (``bench.fused.other_heads``) against the same float64 reference.

    Informational (``ok`` None): they are what klbelt is compared with, not what it promises. A head
    returning per-token log-probs ``[N]`` gets the per-token gradient ``g``; one returning their sum
    (Liger) gets 1, against a float64 reference of the sum. A head that fails reports its error.
    """
    n, hsize = h.shape
    v = w.shape[0]
    ref_out, ref_gh, ref_gw = ref
    rows = []
    sum_ref = None
    for name, fn in others.items():
        row = {"check": f"{name} (other head)", "shape": f"{n}x{hsize}x{v}", "dtype": str(dtype).removeprefix("torch."),
               "path": "other", "forward_tolerance": None, "gradient_tolerance": None, "ok": None}
        try:
            hr, wr = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
            out = fn(hr, wr, t)
            summed = out.numel() == 1 and n != 1
            gh, gw = torch.autograd.grad(out, (hr, wr), (torch.ones_like(out) if summed else g.to(out.dtype)))
            if summed:
                if sum_ref is None:
                    sum_ref = _sum_reference(torch, h, w, t)
                fwd_err = float((out.detach().double().sum() - ref_out.sum()).abs()) / n
                grad_err = max(_rel(gh, sum_ref[0]), _rel(gw, sum_ref[1]))
                row["forward_error_kind"] = "sum abs / N"
            else:
                fwd_err = float((out.detach().double() - ref_out).abs().max())
                grad_err = max(_rel(gh, ref_gh), _rel(gw, ref_gw))
                row["forward_error_kind"] = "max abs"
            row.update(forward_error=fwd_err, gradient_rel_error=grad_err,
                       gradient_h_rel_error=_rel(gh, sum_ref[0] if summed else ref_gh),
                       gradient_w_rel_error=_rel(gw, sum_ref[1] if summed else ref_gw))
            del out, gh, gw, hr, wr
        except Exception as exc:  # e.g. a head without an fp32 backward
            row.update(forward_error_kind="error", forward_error=None, gradient_rel_error=None,
                       error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
    return rows


def _sum_reference(torch, h, w, t):
    """float64 gradients of the summed log-probs (output gradient 1 per token) for (hidden, weight)."""
    wd = w.double().requires_grad_(True)
    gh = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    for s in _ref_chunks(h.shape[0]):
        hd = h[s].double().requires_grad_(True)
        torch.log_softmax(hd @ wd.T, -1).gather(-1, t[s, None]).sum().backward()
        gh[s] = hd.grad
    return gh, wd.grad


def _row(name, shape, dtype, path, fwd_err, grad_err, fwd_kind):
    dname = str(dtype).removeprefix("torch.")
    fwd_tol, grad_tol = FORWARD_TOLERANCE[fwd_kind], GRADIENT_TOLERANCE[dname]
    return {"check": name, "shape": "x".join(map(str, shape)), "dtype": dname, "path": path,
            "forward_error": fwd_err, "forward_error_kind": fwd_kind, "forward_tolerance": fwd_tol,
            "gradient_rel_error": grad_err, "gradient_tolerance": grad_tol,
            "ok": fwd_err <= fwd_tol and grad_err <= grad_tol}


def check_correctness(device: str, n: int, v: int, head_shapes, others=None, report=None) -> list[dict]:
    """Every correctness row (see the module docstring) at logits ``[n, v]`` and the given head shapes.

    ``others``: other fused heads (``name -> fn(hidden, weight, tokens)``) checked beside
    ``logprobs_from_hidden``, informational rows; default: those ``bench.fused.other_heads``
    finds installed, on CUDA only. ``report``: called with each row as it is made.
    """
    import torch

    if others is None:
        others = _installed_heads() if device == "cuda" else {}
    rows = []

    def add(new):
        for row in new:
            rows.append(row)
            if report is not None:
                report(row)

    for dtype in (torch.float32, torch.bfloat16):
        add(_check_logits(torch, device, n, v, dtype))
        for shape in head_shapes:
            add(_check_head(torch, device, *shape, dtype, others))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _installed_heads() -> dict:
    import importlib.util

    from .fused import other_heads

    found = {m: importlib.util.find_spec(m) is not None for m in ("liger_kernel", "cut_cross_entropy")}
    return other_heads(found["liger_kernel"], found["cut_cross_entropy"])


def _bench(args: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "klbelt", "bench", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"klbelt bench {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def run_benches(device: str, logits_shape, head_shapes, repeats: int | None, report=None) -> tuple[list[dict], list[dict]]:
    """``klbelt bench kernels`` at the logits shape, then ``klbelt bench fused`` at each head shape (both bf16
    backward modes), each in its own process; ``report(kind, rows)`` after each ("kernels" or "fused")."""
    rep = [] if repeats is None else ["--repeats", str(repeats)]
    n, v = logits_shape
    kernels = _bench(["kernels", "--device", device, "--rows", str(n), "--vocab", str(v), "--dtypes", "bf16,fp32",
                      *rep] + (["--no-memory", "--warmup", "0"] if device == "cpu" else []))
    if report is not None:
        report("kernels", kernels)
    fused = []
    for n, hsize, v in head_shapes:
        new = _bench(["fused", "--device", device, "--rows", str(n), "--hidden", str(hsize), "--vocab", str(v),
                      "--dtypes", "bfloat16", "--functions", "logprobs,kl", "--head-backward", "one-pass,bounded", *rep]
                     + (["--no-memory", "--in-process", "--impls", "unfused,fused"] if device == "cpu" else []))
        fused += new
        if report is not None:
            report("fused", new)
    return kernels, fused


def table(correct: list[dict], kernels: list[dict], fused: list[dict], device: str = "cuda") -> list[str]:
    """The lines of the one table: correctness, then every bench figure beside its floor and target."""
    return CORRECTNESS_HEADER + [correctness_line(r) for r in correct] + bench_lines(kernels, fused, device)


CORRECTNESS_HEADER = [
    "correctness against float64 (per-token output gradient):",
    f"  {'check':22s} {'shape':20s} {'dtype':9s} {'path':6s} {'forward err':>22s} {'grad rel err':>12s}  ok",
]


def correctness_line(r: dict) -> str:
    """One correctness row as a line of the table (other heads: ``info``, their errors as measured)."""
    head = f"  {r['check']:22s} {r['shape']:20s} {r['dtype']:9s} {r['path']:6s} "
    if r.get("error"):
        return head + f"failed: {r['error']}"
    if r["ok"] is None:
        return (head + f"{r['forward_error_kind']} {r['forward_error']:.2e} {r['gradient_rel_error']:12.2e}  info "
                f"(grad rel err hidden {r['gradient_h_rel_error']:.2e}, weight {r['gradient_w_rel_error']:.2e})")
    return (head + f"{r['forward_error_kind']} {r['forward_error']:.2e} <= {r['forward_tolerance']:.0e} "
            f"{r['gradient_rel_error']:12.2e}  {'yes' if r['ok'] else 'NO'}")


def _met(ok: bool, dtype: str, device: str) -> str:
    if device != "cuda":
        return "n/a (targets are for an H200)"
    return ("met" if ok else "NOT met") + ("" if dtype in ("bf16", "bfloat16") else " (target is for bf16)")


KERNELS_HEADER = "logits kernels (klbelt bench kernels): median ms / floor ms (measured in the same run) = x floor; target"
FUSED_HEADER = ("fused head (klbelt bench fused): fused ms / matmul floor = x; extra peak MB; the torch kernels' "
                "head and other heads ms (bf16 backward mode in brackets)")


def kernel_lines(kernels: list[dict], device: str = "cuda") -> list[str]:
    """One line per logits-kernel bench row: its median beside the floor and the issue's target."""
    lines, seen = [], set()
    torch_ms = {(r["name"], r["dtype"], r["pass"]): r["baseline_median_ms"]
                for r in kernels if r.get("baseline") == "klbelt, torch kernels"}
    for r in kernels:
        key = (r["name"], r["dtype"], r["pass"])
        if key in seen:
            continue
        seen.add(key)
        target = TARGETS[f"logits {r['pass']}"]
        lines.append(f"  {r['name']:22s} {r['rows']}x{r['vocab']} {r['dtype']:5s} {r['pass']:16s} "
                     f"{r['median_ms']:9.3f} / {r['floor_ms']:9.3f} ({r['floor']}) = {r['over_floor']:.2f}x; "
                     f"<= {target}x: {_met(r['over_floor'] <= target, r['dtype'], device)}; triton: {r['triton']}"
                     + (f"; torch kernels {torch_ms[key]:.3f} ms" if key in torch_ms else ""))
    return lines


def fused_lines(fused: list[dict], device: str = "cuda") -> list[str]:
    """One line per fused-head bench row: time over the matmul floor, extra peak, the other heads' times."""
    lines = []
    for r in fused:
        target = TARGETS[f"head {r['pass']}"]
        ratio = r.get("fused_over_matmul")
        others = {o: r[f"{o}_ms"] for o in ("cce", "cce_exact", "liger") if r.get(f"{o}_ms") is not None}
        peak = r.get("fused_extra_peak_mb")
        faster = all(r["fused_ms"] < others[o] for o in ("cce", "liger") if o in others) if others else None
        mode = f" [{r['head_backward']}]" if r["pass"] != "forward" and r.get("head_backward") else ""
        lines.append(
            f"  {r['function']:8s} {r['rows']}x{r['hidden']}x{r['vocab']} {r['dtype']} {r['pass']:16s}{mode} "
            f"fused {r['fused_ms']:.3f} ms, matmul {r['matmul_ms']:.3f} ms: "
            f"{'n/a' if ratio is None else format(ratio, '.2f')}x (<= {target}x: "
            f"{'n/a' if ratio is None else _met(ratio <= target, r['dtype'], device)}); extra peak "
            f"{'n/a' if peak is None else format(peak, '.1f')} MB "
            f"(<= 16: {'n/a' if peak is None else _met(peak <= 16, r['dtype'], device)})"
            + ("" if r.get("triton") is None else f"; triton: {r['triton']}")
            + (f" (given up: {r['triton_failure']})" if r.get("triton_failure") else "")
            + ("" if r.get("fused_torch_ms") is None else
               f"; torch kernels' head {r['fused_torch_ms']:.3f} ms ({r['fused_ms'] / r['fused_torch_ms']:.2f}x of it)")
            + "".join(f"; {o} {ms:.3f} ms" for o, ms in others.items())
            + "".join(f"; {o} failed: {r[o + '_error']}" for o in ("cce", "cce_exact", "liger") if r.get(o + "_error"))
            + ("" if faster is None else f"; faster than CCE (filtered) and Liger: {'yes' if faster else 'no'}")
        )
    return lines


def bench_lines(kernels: list[dict], fused: list[dict], device: str = "cuda") -> list[str]:
    """The bench part of the table: every figure beside its floor and the issue's target."""
    return [KERNELS_HEADER, *kernel_lines(kernels, device), FUSED_HEADER, *fused_lines(fused, device)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klbelt.bench.gpu_check_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help=f"logits {TINY_LOGITS}, head {TINY_HEADS} (CI, interpreter)")
    parser.add_argument("--no-bench", action="store_true", help="correctness only")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per bench cell (default: the benches')")
    parser.add_argument("--json", metavar="FILE", help="also write every row to FILE")
    args = parser.parse_args(argv)
    if args.device == "cpu":  # before Triton is imported (here and in the bench processes)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["KLBELT_TRITON_CPU"] = "1"
    import torch

    from klbelt.kl import _triton

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_kernels: --device cuda but torch sees no CUDA device (use --device cpu --tiny)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        _triton.set_cpu_interpreter(True)
    logits_shape, head_shapes = (TINY_LOGITS, TINY_HEADS) if args.tiny else (LOGITS_SHAPE, HEAD_SHAPES)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, Triton interpreter (timings mean nothing)"
    # every line as soon as its figures exist, and the JSON rewritten after each step: a run cut short
    # (the GPU check's step timeout) keeps what it measured
    doc = {"correctness": [], "kernels": [], "fused": [], "triton_failure": None, "complete": False}
    print(f"klbelt kernel check on {where}; torch {torch.__version__}", flush=True)
    print("\n".join(CORRECTNESS_HEADER), flush=True)

    def correct_row(row):
        doc["correctness"].append(row)
        print(correctness_line(row), flush=True)
        _save(args.json, doc)

    def bench_rows(kind, rows):
        if kind == "kernels" or not doc["fused"]:
            print(KERNELS_HEADER if kind == "kernels" else FUSED_HEADER, flush=True)
        doc[kind] += rows
        print("\n".join((kernel_lines if kind == "kernels" else fused_lines)(rows, args.device)), flush=True)
        _save(args.json, doc)

    check_correctness(args.device, *logits_shape, head_shapes, report=correct_row)
    if not args.no_bench:
        run_benches(args.device, logits_shape, head_shapes, args.repeats, report=bench_rows)
    failure = _triton.failure() or next((r["triton_failure"] for r in doc["fused"] if r.get("triton_failure")), None)
    if failure:  # the rows after it ran the torch kernels
        print(f"Triton kernels given up: {failure}")
    doc.update(triton_failure=failure, complete=True)
    _save(args.json, doc)
    return 0 if all(r["ok"] is not False for r in doc["correctness"]) and not failure else 1


def _save(path: str | None, doc: dict) -> None:
    """Write ``doc`` to ``path`` as JSON whole or not at all (a temporary file, then a rename)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)

if __name__ == "__main__":
    raise SystemExit(main())
