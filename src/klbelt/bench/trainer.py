"""``klbelt bench trainer``: whole PPO updates per second, klbelt's trainer against TRL's PPOTrainer and the floor.

Both trainers do identical work: a GPT-2 policy (``--layers`` x ``--dim``,
``--vocab`` tokens, random init from one seed), a frozen reference (a copy of
the policy), a value model (the policy's trunk with a zero scalar head) and a
reward model (a GPT-2 sequence classifier) of the same size; the same prompts
(``--prompt-len`` tokens, no padding), full-length responses (klbelt:
``block_eos``; TRL: no stop token), the same epochs x minibatches with one
AdamW step per minibatch, fp32 on the CPU with ``--threads`` threads, k1 KL in
the reward, GAE, whitened advantages. The settings:

* A: batch 8, 16 response tokens, 1 epoch x 1 minibatch (overhead-bound);
* B: batch 64, 32 response tokens, 4 epochs x 4 minibatches (compute-bound).

Timing: each measurement runs in a fresh process; klbelt and TRL alternate
(``--runs`` each, the order flipping every run) so machine drift hits both
alike. A run trains ``--warmup`` + ``--updates`` updates; an update's time runs
from the end of the update before it to its own end (a whole update:
rollout, scoring, advantages, optimisation, logging, TRL's gc.collect()).
The reported time is the median over every timed update of every run (robust
to other processes taking the CPU for a while); tokens/s = batch x response
tokens / that time.

TRL's side and its configuration: ``klbelt.bench.baselines.trl`` (``ppo_gpt2``). The
floor, the passes no PPO update can avoid timed alone in ``--floor-repeats`` rounds:
``klbelt.bench.floor`` (``gpt2_floor``); ``floor_ratio`` = klbelt seconds per update /
floor seconds; ``floor_parts_s`` says what the floor is made of. The shared work (models,
prompts, tokenizer): ``klbelt.bench.work``; the timing: ``klbelt.bench._timing``.

Peak memory (``*_peak_mb``): measured in one more run per trainer, with
glibc returning every freed block of 64 KiB or more to the OS (see
``klbelt.bench._memory``) so resident memory follows live memory: the peak
resident size during training (reset via ``/proc/self/clear_refs`` just
before it starts) minus the resident size then. At that point libraries are
imported, the shared models (policy, reference, reward) are built and one
throwaway pass of each kind has run (so code pages and thread pools are paid
for alike); the value model, optimiser state, gradients and activations
count. ``None`` where the peak cannot be reset (not Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from . import _timing
from ._memory import CHILD_ENV, peak_growth_mb, reset_peak_kib
from ._timing import Stop, intervals as _intervals
from .work import gpt2_work, prewarm

DESCRIPTION = "tokens/s of whole PPO updates: klbelt's trainer vs TRL's PPOTrainer and the floor (settings A and B)"

SETTINGS = {
    "A": {"batch": 8, "response_tokens": 16, "epochs": 1, "minibatches": 1},
    "B": {"batch": 64, "response_tokens": 32, "epochs": 4, "minibatches": 4},
}
TARGETS = {"A": {"speedup": 8.0, "floor_ratio": 1.6}, "B": {"speedup": 1.4, "floor_ratio": 1.15}}


def add_arguments(parser) -> None:
    parser.add_argument("--settings", default="A,B", help="comma-separated settings to run (A, B)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates at the start of each run")
    parser.add_argument("--updates", type=int, default=6, help="timed updates per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer (klbelt and TRL alternate)")
    parser.add_argument("--floor-repeats", type=int, default=15, help="timed repeats of each floor pass (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every measured process")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 layers of every model")
    parser.add_argument("--dim", type=int, default=128, help="GPT-2 hidden size of every model")
    parser.add_argument("--heads", type=int, default=4, help="GPT-2 attention heads")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (word-level tokenizer built locally)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=None, help="override the settings' batch size")
    parser.add_argument("--response-tokens", type=int, default=None, help="override the settings' response length")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (klbelt and the floor only)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per setting")
    parser.add_argument("--json-out", default=None, help="also write that JSON list to this file")
    parser.add_argument("--model", default=None,
                        help="smollm2 or a local causal-LM directory: time the English demo's update on that model "
                        "against TRL's PPOTrainer and GRPOTrainer and the floor instead (see klbelt.bench.real_model)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda: on a GPU, the English demo's update on --model (default "
                        "smollm2-shaped: SmolLM2-135M's shape, random weights, nothing downloaded) beside its floor")
    parser.add_argument("--memory", action="store_true", help="with --model: peak memory of one update with full logits vs the fused LM head")
    parser.add_argument("--memory-batch", type=int, default=64, help="with --memory: sequences (default 64)")
    parser.add_argument("--memory-tokens", type=int, default=128, help="with --memory: response tokens (default 128)")
    parser.add_argument("--trl-python", default=None, help="with --model: run TRL's GRPOTrainer under this Python (default: the repository's "
                        ".venv-trl-latest holding the newest TRL, where it exists; else this Python)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec


# --------------------------------------------------------------------------- klbelt's side (in its own process)


def klbelt_gpt2(spec: dict) -> dict:
    """klbelt's trainer on the GPT-2 work: timed updates and the peak memory growth during training."""
    import tempfile

    import torch

    from klbelt.rl.config import TrainConfig
    from klbelt.rl.reward_model import RewardModel
    from klbelt.rl.trainer import train

    tok, prompts, policy, ref, reward = gpt2_work(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    def on_step(record):
        ends.append(time.perf_counter())
        if len(ends) == total:
            raise Stop  # before the extra step that would write the final checkpoint

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model="bench", reward="bench", seed=spec["seed"], steps=total + 1, batch_size=spec["batch"],
            max_new_tokens=spec["response_tokens"], temperature=1.0, block_eos=True, kl_in="reward", kl_estimator="k1",
            kl_coef=0.05, controller="fixed", advantage="gae", ppo_epochs=spec["epochs"], minibatches=spec["minibatches"],
            lr=1e-5, critic_lr=1e-5, out=out, checkpoint_every=10**9, samples_every=10**9,
        )
        scorer = RewardModel(reward, tok)
        prewarm(policy, reward, tok(prompts[: spec["batch"]], return_tensors="pt")["input_ids"])
        torch.manual_seed(spec["seed"])
        rss = reset_peak_kib()
        try:
            train(cfg, policy, tok, prompts, scorer, ref_policy=ref, on_step=on_step)
        except Stop:
            pass
        peak = peak_growth_mb(rss)
    return {"intervals": _intervals(ends, spec["warmup"], spec["updates"]), "peak_mb": peak}


CHILDREN = {"klbelt": "klbelt.bench.trainer:klbelt_gpt2", "trl": "klbelt.bench.baselines.trl:ppo_gpt2",
            "floor": "klbelt.bench.floor:gpt2_floor"}


def _measure(spec: dict) -> dict:
    """One measurement of ``spec["side"]`` in a fresh process (memory mode: glibc returns freed blocks)."""
    extra_env = CHILD_ENV if spec.get("mode") == "memory" else None  # resident size then follows live memory
    return _timing.measure(dict(spec, child=CHILDREN[spec["side"]]), extra_env=extra_env)


# --------------------------------------------------------------------------- the parent


def run(args) -> int:
    if args.child is not None:  # one measurement: a spec naming its "child" function, or a "side" of this benchmark
        spec = json.loads(args.child)
        return _timing.child_main(json.dumps({"child": CHILDREN.get(spec.get("side"), ""), **spec}))
    if getattr(args, "device", "cpu") != "cpu" and args.model is None:
        from .work import SMOLLM2_SHAPED

        args.model = SMOLLM2_SHAPED  # the GPU's measurement is the English demo's update
    if args.model is not None:
        from . import real_model

        return real_model.run_memory(args) if args.memory else real_model.run(args)
    names = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        print(f"klbelt bench trainer: --settings must list settings from {', '.join(SETTINGS)}; got {args.settings!r}", file=sys.stderr)
        return 2
    for name in ("warmup", "updates", "runs", "floor_repeats", "threads"):
        if getattr(args, name) < 1:
            print(f"klbelt bench trainer: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    rows = []
    for name in names:
        setting = dict(SETTINGS[name])
        if args.batch is not None:
            setting["batch"] = args.batch
        if args.response_tokens is not None:
            setting["response_tokens"] = args.response_tokens
        if setting["batch"] % setting["minibatches"]:
            print(f"klbelt bench trainer: batch {setting['batch']} must divide by {setting['minibatches']} minibatches", file=sys.stderr)
            return 2
        base = dict(setting, warmup=args.warmup, updates=args.updates, threads=args.threads, layers=args.layers,
                    dim=args.dim, heads=args.heads, vocab=args.vocab, prompt_len=args.prompt_len, seed=0,
                    floor_repeats=args.floor_repeats, mode="time")
        sides = ["klbelt"] if args.no_trl else ["klbelt", "trl"]
        results: dict[str, list[dict]] = {"klbelt": [], "trl": [], "floor": []}
        for r in range(args.runs):
            for side in (sides if r % 2 == 0 else sides[::-1]) + ["floor"]:
                results[side].append(_measure(dict(base, side=side)))
        memory = {side: _measure(dict(base, side=side, mode="memory", updates=min(args.updates, 2))) for side in sides}
        rows.append(_row(name, setting, args, results, memory))
    if args.json_out:
        from klbelt._files import atomic_write

        atomic_write(args.json_out, "w", lambda f: f.write(json.dumps(rows, indent=1) + "\n"))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, args)
    return 0


def _row(name: str, setting: dict, args, results: dict, memory: dict) -> dict:
    tokens = setting["batch"] * setting["response_tokens"]

    k_s, t_s = _timing.pooled_median(results["klbelt"]), _timing.pooled_median(results["trl"])
    parts = {p: statistics.median(r["parts"][p] for r in results["floor"]) for p in results["floor"][0]["parts"]}
    f_s = sum(parts.values())
    row = {
        "setting": name,
        **setting,
        "klbelt_tokens_per_s": tokens / k_s,
        "trl_tokens_per_s": tokens / t_s if t_s else None,
        "speedup": t_s / k_s if t_s else None,
        "floor_tokens_per_s": tokens / f_s,
        "floor_ratio": k_s / f_s,
        "klbelt_peak_mb": memory["klbelt"]["peak_mb"],
        "trl_peak_mb": memory["trl"]["peak_mb"] if "trl" in memory else None,
        "klbelt_s_per_update": k_s,
        "trl_s_per_update": t_s,
        "floor_s_per_update": f_s,
        "floor_parts_s": parts,
        "klbelt_runs_s": [statistics.median(r["intervals"]) for r in results["klbelt"]],
        "trl_runs_s": [statistics.median(r["intervals"]) for r in results["trl"]],
        "trl_optimizer": results["trl"][0].get("optimizer") if results["trl"] else None,
        "runs": args.runs, "warmup": args.warmup, "updates": args.updates, "threads": args.threads,
        "model": f"GPT-2 {args.layers} layers x {args.dim} dims, {args.heads} heads, vocab {args.vocab}, prompt {args.prompt_len} tokens",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    target = TARGETS.get(name)
    if target and row["speedup"] is not None:
        row["targets"] = dict(target, peak="klbelt_peak_mb <= trl_peak_mb")
        row["meets_targets"] = {
            "speedup": row["speedup"] >= target["speedup"],
            "floor_ratio": row["floor_ratio"] <= target["floor_ratio"],
            "peak": None if row["klbelt_peak_mb"] is None or row["trl_peak_mb"] is None else row["klbelt_peak_mb"] <= row["trl_peak_mb"],
        }
    return row


def _fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def _print_table(rows: list[dict], args) -> None:
    print(f"PPO updates, steady state: median update time over {args.runs} alternating runs x {args.updates} timed updates "
          f"(after {args.warmup} warm-up), {args.threads} thread(s), fp32 CPU; {rows[0]['model']}")
    head = f"{'setting':<8}{'klbelt tok/s':>13}{'TRL tok/s':>11}{'speedup':>9}{'floor tok/s':>13}{'klbelt/floor':>14}{'klbelt MB':>11}{'TRL MB':>9}"
    print(head)
    for r in rows:
        label = f"{r['setting']} {r['batch']}x{r['response_tokens']}"
        print(f"{label:<8}{_fmt(r['klbelt_tokens_per_s']):>13}{_fmt(r['trl_tokens_per_s']):>11}{_fmt(r['speedup'], '{:.2f}x'):>9}"
              f"{_fmt(r['floor_tokens_per_s']):>13}{_fmt(r['floor_ratio'], '{:.2f}x'):>14}"
              f"{_fmt(r['klbelt_peak_mb'], '{:.1f}'):>11}{_fmt(r['trl_peak_mb'], '{:.1f}'):>9}")
    for r in rows:
        parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in r["floor_parts_s"].items())
        print(f"floor {r['setting']} (ms per update): {parts}")
    print("MB = peak growth of resident memory during training over the process's size when it starts (libraries loaded, "
          "shared models built, one throwaway pass of each kind run), in a separate run with glibc returning freed blocks.")
    print(f"load average at the end: {rows[-1]['load_average']}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
