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
TARGETS = {  # the issue's targets on an H200, bf16
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


def _check_head(torch, device, n, hsize, v, dtype):
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
        del out, gh, gw, wd, ref_gh
    return rows


def _row(name, shape, dtype, path, fwd_err, grad_err, fwd_kind):
    dname = str(dtype).removeprefix("torch.")
    fwd_tol, grad_tol = FORWARD_TOLERANCE[fwd_kind], GRADIENT_TOLERANCE[dname]
    return {"check": name, "shape": "x".join(map(str, shape)), "dtype": dname, "path": path,
            "forward_error": fwd_err, "forward_error_kind": fwd_kind, "forward_tolerance": fwd_tol,
            "gradient_rel_error": grad_err, "gradient_tolerance": grad_tol,
            "ok": fwd_err <= fwd_tol and grad_err <= grad_tol}


def check_correctness(device: str, n: int, v: int, head_shapes) -> list[dict]:
    """Every correctness row (see the module docstring) at logits ``[n, v]`` and the given head shapes."""
    import torch

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += _check_logits(torch, device, n, v, dtype)
        for shape in head_shapes:
            rows += _check_head(torch, device, *shape, dtype)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _bench(args: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "klbelt", "bench", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"klbelt bench {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def run_benches(device: str, logits_shape, head_shapes, repeats: int | None) -> tuple[list[dict], list[dict]]:
    rep = [] if repeats is None else ["--repeats", str(repeats)]
    n, v = logits_shape
    kernels = _bench(["kernels", "--device", device, "--rows", str(n), "--vocab", str(v), "--dtypes", "bf16,fp32",
                      *rep] + (["--no-memory", "--warmup", "0"] if device == "cpu" else []))
    fused = []
    for n, hsize, v in head_shapes:
        fused += _bench(["fused", "--device", device, "--rows", str(n), "--hidden", str(hsize), "--vocab", str(v),
                         "--dtypes", "bfloat16", "--functions", "logprobs,kl", *rep]
                        + (["--no-memory", "--impls", "unfused,fused"] if device == "cpu" else []))
    return kernels, fused


def table(correct: list[dict], kernels: list[dict], fused: list[dict], device: str = "cuda") -> list[str]:
    """The lines of the one table: correctness, then every bench figure beside its floor and target."""
    def _met(ok: bool, dtype: str) -> str:
        if device != "cuda":
            return "n/a (targets are for an H200)"
        return ("met" if ok else "NOT met") + ("" if dtype in ("bf16", "bfloat16") else " (target is for bf16)")

    lines = ["correctness against float64 (per-token output gradient):",
             f"  {'check':22s} {'shape':20s} {'dtype':9s} {'path':6s} {'forward err':>22s} {'grad rel err':>12s}  ok"]
    for r in correct:
        lines.append(f"  {r['check']:22s} {r['shape']:20s} {r['dtype']:9s} {r['path']:6s} "
                     f"{r['forward_error_kind']} {r['forward_error']:.2e} <= {r['forward_tolerance']:.0e} "
                     f"{r['gradient_rel_error']:12.2e}  {'yes' if r['ok'] else 'NO'}")
    lines.append("logits kernels (klbelt bench kernels): median ms / floor ms (measured in the same run) = x floor; target")
    seen = set()
    for r in kernels:
        key = (r["name"], r["dtype"], r["pass"])
        if key in seen:
            continue
        seen.add(key)
        target = TARGETS[f"logits {r['pass']}"]
        lines.append(f"  {r['name']:22s} {r['rows']}x{r['vocab']} {r['dtype']:5s} {r['pass']:16s} "
                     f"{r['median_ms']:9.3f} / {r['floor_ms']:9.3f} ({r['floor']}) = {r['over_floor']:.2f}x; "
                     f"<= {target}x: {_met(r['over_floor'] <= target, r['dtype'])}; triton: {r['triton']}")
    lines.append("fused head (klbelt bench fused): fused ms / matmul floor = x; extra peak MB; other heads ms")
    for r in fused:
        target = TARGETS[f"head {r['pass']}"]
        ratio = r.get("fused_over_matmul")
        others = {o: r[f"{o}_ms"] for o in ("cce", "cce_exact", "liger") if r.get(f"{o}_ms") is not None}
        peak = r.get("fused_extra_peak_mb")
        faster = all(r["fused_ms"] < others[o] for o in ("cce", "liger") if o in others) if others else None
        lines.append(
            f"  {r['function']:8s} {r['rows']}x{r['hidden']}x{r['vocab']} {r['dtype']} {r['pass']:16s} "
            f"fused {r['fused_ms']:.3f} ms, matmul {r['matmul_ms']:.3f} ms: "
            f"{'n/a' if ratio is None else format(ratio, '.2f')}x (<= {target}x: "
            f"{'n/a' if ratio is None else _met(ratio <= target, r['dtype'])}); extra peak "
            f"{'n/a' if peak is None else format(peak, '.1f')} MB (<= 16: {'n/a' if peak is None else _met(peak <= 16, r['dtype'])})"
            + "".join(f"; {o} {ms:.3f} ms" for o, ms in others.items())
            + ("" if faster is None else f"; faster than CCE (filtered) and Liger: {'yes' if faster else 'no'}")
        )
    return lines


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
    correct = check_correctness(args.device, *logits_shape, head_shapes)
    kernels, fused = ([], []) if args.no_bench else run_benches(args.device, logits_shape, head_shapes, args.repeats)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, Triton interpreter (timings mean nothing)"
    print(f"klbelt kernel check on {where}; torch {torch.__version__}")
    print("\n".join(table(correct, kernels, fused, args.device)))
    failure = _triton.failure()
    if failure:  # the rows after it ran the torch kernels
        print(f"Triton kernels given up: {failure}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"correctness": correct, "kernels": kernels, "fused": fused, "triton_failure": failure}, fh, indent=1)
    return 0 if all(r["ok"] for r in correct) and not failure else 1


if __name__ == "__main__":
    raise SystemExit(main())
