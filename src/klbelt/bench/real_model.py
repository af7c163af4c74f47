"""``klbelt bench trainer --model smollm2``: one update of the English demo, klbelt against TRL's PPOTrainer,
TRL's GRPOTrainer and the floor.

The work is the English demo's (``klbelt.demo.task.ENGLISH_DEMO_CONFIG``): SmolLM2-135M-Instruct,
16 sequences per update (4 prompts x 4 samples), 24 response tokens at temperature 1 (full
length), LoRA rank 16 on every attention and MLP projection (peft), the reference = the same
weights with the adapters disabled, a group baseline (no critic), VADER as the reward, beta 0.1
fixed, one AdamW step per update. Every measurement runs in a fresh process with ``--threads``
threads; the sides take turns run by run (the order rotating). The time of an update runs from
the end of the update before it to its own end (median over every timed update of every run);
tokens/s = 16 x 24 / that time. ``*_peak_rss_mb`` is the process's resident high-water mark
(ru_maxrss), model included.

* klbelt: ``klbelt.rl.train`` with the demo config (bf16 autocast on the trained pass where the
  CPU supports it; sampling and the reference pass in fp32, where they measured faster or exact).
* TRL's trainers on the same work (``klbelt.bench.baselines.trl``): ``PPOTrainer`` of the TRL in
  this Python (``ppo_english``: it needs a critic, which klbelt's update does not have) and
  ``GRPOTrainer`` (``grpo_english``) under ``--trl-python``, by default the repository's
  ``.venv-trl-latest`` (the newest TRL that installs here) where it exists.
* The floor (``klbelt.bench.floor.english_floor``): the passes no such update can avoid, each
  timed alone on the same modules.

``speedup_vs_faster_trl`` = the faster TRL trainer's seconds per update / klbelt's (target
>= 1.5); ``floor_ratio`` = klbelt's / the floor's (target <= 1.2).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import _timing
from ._timing import Stop, peak_rss_mb
from .work import english_work

def _tokens() -> int:
    """Tokens sampled per update by the English work these benches time (the demo's batch x response length)."""
    from ..demo.task import ENGLISH_DEMO_CONFIG

    return ENGLISH_DEMO_CONFIG.batch_size * ENGLISH_DEMO_CONFIG.max_new_tokens


TOKENS = _tokens()
CHILDREN = {
    "klbelt": "klbelt.bench.real_model:klbelt_english",
    "trl_ppo": "klbelt.bench.baselines.trl:ppo_english",
    "trl_grpo": "klbelt.bench.baselines.trl:grpo_english",
    "floor": "klbelt.bench.floor:english_floor",
    "memory": "klbelt.bench.real_model:memory_english",
}
LATEST_TRL_VENV = ".venv-trl-latest"  # made by scripts/setup.sh: --system-site-packages + the newest TRL


def klbelt_english(spec: dict) -> dict:
    """klbelt's trainer on the English demo's update: timed updates and the peak RSS."""
    import tempfile
    from dataclasses import replace

    from klbelt.demo.rewards import proxy_reward
    from klbelt.rl.trainer import train

    model, tok, prompts, cfg = english_work(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    def on_step(record):
        ends.append(time.perf_counter())
        if len(ends) == total:
            raise Stop

    with tempfile.TemporaryDirectory() as out:
        try:
            train(replace(cfg, out=out), model, tok, prompts, proxy_reward, on_step=on_step, warn_alerts=False)
        except Stop:
            pass
    return {"intervals": _timing.intervals(ends, spec["warmup"]), "peak_rss_mb": peak_rss_mb()}


def memory_english(spec: dict) -> dict:
    """One update of ``memory_batch`` x ``memory_tokens`` with the fused head on or off: peak RSS growth over the loaded model."""
    import tempfile
    from dataclasses import replace

    from klbelt.demo.rewards import proxy_reward
    from klbelt.rl.trainer import train

    model, tok, prompts, cfg = english_work(spec)
    base_mb = peak_rss_mb()
    cfg = replace(cfg, steps=1, batch_size=spec["memory_batch"], max_new_tokens=spec["memory_tokens"], fused_head=spec["fused"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(replace(cfg, out=out), model, tok, prompts, proxy_reward, warn_alerts=False)
    return {"peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": base_mb, "seconds": time.perf_counter() - t0}


def run_memory(args) -> int:
    """``--memory``: the trainer's peak resident memory with full logits vs the fused LM head."""
    spec = dict(model=args.model, warmup=1, updates=1, threads=args.threads, floor_repeats=1, bf16=False,
                memory_batch=args.memory_batch, memory_tokens=args.memory_tokens)
    rows = []
    for fused in (False, True):
        r = _measure(dict(spec, side="memory", fused=fused))
        rows.append({"fused_head": fused, **r, "growth_mb": r["peak_rss_mb"] - r["loaded_rss_mb"]})
    logits_mb = args.memory_batch * args.memory_tokens * 49152 * 4 / 2**20
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"one update of {args.memory_batch} x {args.memory_tokens} response tokens on {args.model} (LoRA r16, fp32), "
          f"fp32 [B, R, V] logits = {logits_mb:.0f} MB")
    print(f"{'scoring':<14}{'peak RSS MB':>12}{'model loaded MB':>17}{'growth MB':>11}{'seconds':>9}")
    for r in rows:
        label = "fused head" if r["fused_head"] else "full logits"
        print(f"{label:<14}{r['peak_rss_mb']:>12.0f}{r['loaded_rss_mb']:>17.0f}{r['growth_mb']:>11.0f}{r['seconds']:>9.1f}")
    return 0


def _measure(spec: dict, python: str | None = None) -> dict:
    return _timing.measure(dict(spec, child=CHILDREN[spec["side"]]), python)


def latest_trl_python(given: str | None) -> str | None:
    """The Python for TRL's GRPOTrainer: ``--trl-python``, else the repository's venv with the newest TRL, else None (this one)."""
    if given:
        return given
    venv_python = Path(__file__).resolve().parents[3] / LATEST_TRL_VENV / "bin" / "python"
    return str(venv_python) if venv_python.exists() else None


def run(args) -> int:
    """The parent: klbelt, TRL PPO and TRL GRPO take turns, then the floor; print the table (or JSON).

    On a GPU (``--device cuda``) klbelt and the floor only: TRL's sides are CPU measurements."""
    from klbelt.rl.device import check_device
    from klbelt.rl.precision import bf16_supported

    device = check_device(getattr(args, "device", "cpu"))
    import torch

    bf16 = bool(torch.cuda.is_bf16_supported()) if device.type == "cuda" else bool(bf16_supported())
    spec = dict(model=args.model, warmup=args.warmup, updates=args.updates, threads=args.threads,
                floor_repeats=args.floor_repeats, bf16=bf16, device=str(device))
    from .work import SMOLLM2_SHAPED

    if args.model == SMOLLM2_SHAPED:
        spec["batch_size"] = 16  # issue 25's GPU work: 16 x 24 tokens (4 prompts x 4)
    spec.update(getattr(args, "work", None) or {})  # scripts/gpu_check.py: a smaller model's shape, GAE (klbelt.bench.work)
    pythons = {"klbelt": None, "trl_ppo": None, "trl_grpo": latest_trl_python(args.trl_python)}
    sides = ["klbelt"] if args.no_trl or device.type != "cpu" else list(pythons)
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.runs):
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # each side in each place of the order
            results[side].append(_measure(dict(spec, side=side), pythons[side]))
    floor = _measure(dict(spec, side="floor"))
    row = _row(args, spec, results, floor)
    if args.json_out:
        from klbelt._files import atomic_write

        atomic_write(args.json_out, "w", lambda f: f.write(json.dumps([row], indent=1) + "\n"))
    if args.json:
        print(json.dumps([row], indent=1))
    else:
        _print_table(row, args)
    return 0


def _row(args, spec: dict, results: dict, floor: dict) -> dict:
    def seconds(side):
        return _timing.pooled_median(results.get(side, []))

    def peak(side):
        return max(r["peak_rss_mb"] for r in results[side]) if side in results else None

    def version(side):
        return results[side][0]["trl_version"] if side in results else None

    k_s, ppo_s, grpo_s, f_s = seconds("klbelt"), seconds("trl_ppo"), seconds("trl_grpo"), floor["seconds_per_update"]
    trl_s = min((t for t in (ppo_s, grpo_s) if t), default=None)
    return {
        "model": args.model, "work": "16 x 24 tokens, LoRA r16, group baseline (4 x 4), beta 0.1, 1 AdamW step",
        "device": spec.get("device", "cpu"), "device_name": _device_name(spec.get("device", "cpu")),
        "bf16": spec["bf16"], "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "updates": args.updates,
        "klbelt_s_per_update": k_s, "trl_grpo_s_per_update": grpo_s, "trl_ppo_s_per_update": ppo_s, "floor_s_per_update": f_s,
        "klbelt_tokens_per_s": TOKENS / k_s, "trl_grpo_tokens_per_s": TOKENS / grpo_s if grpo_s else None,
        "trl_ppo_tokens_per_s": TOKENS / ppo_s if ppo_s else None, "floor_tokens_per_s": TOKENS / f_s,
        "speedup_vs_trl_grpo": grpo_s / k_s if grpo_s else None, "speedup_vs_trl_ppo": ppo_s / k_s if ppo_s else None,
        "speedup_vs_faster_trl": trl_s / k_s if trl_s else None, "floor_ratio": k_s / f_s,
        "floor_parts_s": floor["parts"],
        "klbelt_peak_rss_mb": peak("klbelt"), "trl_grpo_peak_rss_mb": peak("trl_grpo"), "trl_ppo_peak_rss_mb": peak("trl_ppo"),
        "trl_version": version("trl_grpo"), "trl_ppo_version": version("trl_ppo"),
        "trl_ppo_response_tokens_per_update": results["trl_ppo"][0]["response_tokens_per_update"] if "trl_ppo" in results else None,
        "runs_s_per_update": {side: [_timing.pooled_median([r]) for r in runs] for side, runs in results.items()},
        "targets": {"klbelt_s_per_update": "<= 4", "speedup_vs_faster_trl": ">= 1.5", "floor_ratio": "<= 1.2",
                    "klbelt_peak_rss_mb": "<= 2048"},
        "load_average": os.getloadavg()[0],
    }


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _print_table(row: dict, args) -> None:
    print(f"English demo update on {args.model}, {row['device']} ({row['device_name']}): {row['work']}; {args.threads} thread(s), bf16 autocast "
          f"{'on' if row['bf16'] else 'off'}; median over {args.runs} run(s) x {args.updates} timed updates "
          f"(after {args.warmup} warm-up)")
    print(f"{'':<24}{'s/update':>10}{'tokens/s':>10}{'peak RSS MB':>13}{'klbelt speedup':>16}")
    lines = [("klbelt", "klbelt"), ("TRL {} PPOTrainer", "trl_ppo"), ("TRL {} GRPOTrainer", "trl_grpo")]
    for label, side in lines:
        s = row[f"{side}_s_per_update"]
        if s is None:
            continue
        version = row["trl_ppo_version"] if side == "trl_ppo" else row["trl_version"]
        speedup = "" if side == "klbelt" else f"{s / row['klbelt_s_per_update']:.2f}x"
        print(f"{label.format(version):<24}{s:>10.2f}{TOKENS / s:>10.1f}{row[side + '_peak_rss_mb']:>13.0f}{speedup:>16}")
    f_s = row["floor_s_per_update"]
    print(f"{'floor':<24}{f_s:>10.2f}{TOKENS / f_s:>10.1f}{'':>13}{1 / row['floor_ratio']:>15.2f}x")
    faster = "-" if row["speedup_vs_faster_trl"] is None else f"{row['speedup_vs_faster_trl']:.2f}x"
    print(f"klbelt vs the faster TRL trainer: {faster} (target >= 1.5x); klbelt / floor: {row['floor_ratio']:.2f}x "
          f"(target <= 1.2x); floor parts (s): " + ", ".join(f"{k} {v:.2f}" for k, v in row["floor_parts_s"].items()))
    print(f"load average at the end: {row['load_average']:.2f}")
