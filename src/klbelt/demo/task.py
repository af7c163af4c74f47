"""The demo task: continue fortune prompts, optimise VADER, judge with the gold reward.

``run_demo`` is what ``klbelt demo`` runs and ``run_sweep`` what ``klbelt sweep``
runs: the trainer (``klbelt.rl.train``) on the shipped tiny model, with
before/after samples and a summary computed from the measured metrics.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..rl.config import TrainConfig
from ..rl.io import atomic_write_text, save_pretrained_atomic
from ..rl.sampling import sample
from ..rl.scoring import response_logprobs
from ..rl.trainer import train

# Demo defaults: about 3 minutes on a 2-core CPU (see DEMO_STEPS), measured, not guessed.
DEMO_CONFIG = TrainConfig(
    model="demo",
    prompts="demo",
    reward="vader",
    steps=150,
    batch_size=64,
    max_new_tokens=32,
    temperature=1.0,
    block_eos=True,  # every continuation is full length: no reward for stopping early
    kl_in="reward",
    kl_estimator="k1",
    kl_coef=0.1,
    # PID holds the KL at the target here (measured: 15-update means 0.044-0.061 nats/token over updates 20-150);
    # the article's step rule (--controller adaptive --target-kl 0.08) limit-cycles between beta 0.010 and 0.58.
    controller="pid",
    target_kl=0.05,
    advantage="gae",
    lr=2e-4,
    critic_lr=1e-3,
    ppo_epochs=1,
    minibatches=1,
    checkpoint_every=25,
    samples_every=25,
    out="runs/demo",
)
N_TRAIN_PROMPTS = 1024
N_SHOW = 4  # prompts shown before/after

# The English demo: SmolLM2-135M-Instruct continues neutral everyday openings (klbelt.demo.english).
# LoRA (the reference is the same weights with the adapters off: no second copy), bf16 autocast
# for the trained passes, and a critic-free group baseline (4 samples of each of 4 prompts): on
# 2 CPU cores a second 135M-parameter network for GAE would double the update's cost.
ENGLISH_DEMO_CONFIG = replace(
    DEMO_CONFIG,
    model="smollm2",
    prompts="english",
    steps=36,
    # 6 prompts x 4 continuations (16 until issue 22): one update's mean reward moved by +-0.1 from noise alone at 16;
    # the headroom of the update (2.8-3.6 s on the two CPUs seen, 5 minutes a run) buys 1.5x the samples
    batch_size=24,
    group_size=4,
    advantage="group",
    max_new_tokens=24,
    lora_rank=16,
    bf16=True,
    # Rollouts from a bf16 copy of the weights with the adapters merged in (synced before each
    # rollout), the trainer's log-probs from PPO's single forward, and full logits (at 16 x 24
    # rows the [N, V] logits are 75 MB): measured by `klbelt bench trainer --model smollm2`,
    # docs/english-demo.md, "How one update runs"; the copy's mismatch with the trained policy is in
    # every step's metrics.
    sampler="bf16-merged",
    fused_head=False,
    # The frozen base's linear weights stored as the bf16 values autocast reads (exact: the same
    # numbers as fp32 weights under autocast), so the model's fp32 file is not held beside them.
    bf16_base=True,
    # on the CPU fp32 attention with the scores materialised: at 33 positions a layer's forward+backward took 12.9 ms
    # through the fused SDPA kernel against 3.6 ms this way (speed_probes/attention_kernels.py); on a GPU, SDPA
    attn_implementation="auto",
    lr=7e-4,  # measured: at 2e-3 Adam's noise-driven steps carried the KL to 0.2-0.3 nats/token with beta near 1.7
    kl_coef=0.1,
    controller="pid",
    # measured, 3 seeds each (second-half KL, target 0.05): the default gains [0.05, 0.02, 1.0] ran
    # high (0.071, 0.060, 0.058); kp 0.12 centres it (docs/measurements/2026-11-29/demo_pid_seeds.txt)
    # Tuned in `klbelt sim --plant demo` (docs/controller.md), a plant with the demo's measured dynamics and noise,
    # then on the demo itself: the KL of the first updates is 0 (policy = reference), which without a warm-up sent
    # beta to 0 and let the KL overshoot to 3.7x the target on an Intel Xeon; with a 6-update warm-up and a 0.02
    # floor, 4 seeds on an AMD EPYC let beta fall to the floor while the KL was still climbing (updates 7-15) and
    # then overshot to 0.08-0.09 (second halves 0.046, 0.060, 0.065, 0.053): hence a 12-update warm-up, a 0.05
    # floor and ki 0.03. k3 is as unbiased as k1 on the policy's tokens and its per-update standard error was 0.20
    # of the KL against k1's 0.44 on this task (4 logged responses per update); a shorter EMA follows it.
    pid_gains=[0.12, 0.03, 1.0],
    pid_warmup=12,
    pid_smoothing=0.5,
    pid_min_kl_coef=0.05,
    controller_estimator="k3",
    target_kl=0.05,
    checkpoint_every=12,
    samples_every=6,
    out="runs/demo",
)


SWEEP_STEPS = {"english": 24}  # updates per sweep run (8 runs of the English task in 30 minutes)
SWEEP_BATCH = {"english": 16}  # continuations per sweep update: the sweep's fixed-beta runs as measured since 2026-11


@dataclass(frozen=True)
class DemoTask:
    """A demo task: its default config, prompts (train and held-out), proxy and gold rewards."""

    name: str
    config: TrainConfig
    prompts: Callable  # (tokenizer, split, n) -> list[str]
    proxy: Callable  # texts -> [B]
    gold: Callable  # (texts, ref_nll [B]) -> [B]


def _fortune_prompts(tokenizer, split: str, n: int) -> list[str]:
    from .corpus import demo_prompts

    return demo_prompts(tokenizer, n=n, prompt_tokens=6, split=split)


def _english_prompts(tokenizer, split: str, n: int) -> list[str]:
    from .english import english_prompts

    return english_prompts(split)[:n]


def task_for(model: str) -> DemoTask:
    """The tiny model's fortune task for "tiny"/"demo", the English task for any other model."""
    from .english import english_gold_reward
    from .models import TINY_NAMES
    from .rewards import gold_reward, proxy_reward

    if model in TINY_NAMES:
        return DemoTask("fortunes", DEMO_CONFIG, _fortune_prompts, proxy_reward, gold_reward)
    return DemoTask("english", replace(ENGLISH_DEMO_CONFIG, model=model), _english_prompts, proxy_reward, english_gold_reward)


def demo_inputs(cfg: TrainConfig):
    """Model, tokenizer, training prompts, proxy and gold reward of the demo task of ``cfg.model``."""
    from .models import load_model

    task = task_for(cfg.model)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    prompts = task.prompts(tokenizer, "train", N_TRAIN_PROMPTS)
    return model, tokenizer, prompts, task.proxy, task.gold


@torch.no_grad()
def show_samples(model, ref, tokenizer, cfg: TrainConfig, n: int = N_SHOW, seed: int = 1234) -> list[dict]:
    """Continuations of ``n`` held-out prompts, with proxy and gold rewards, same seed every time.

    ``ref`` is a :class:`klbelt.rl.scoring.Reference` (or a frozen model) that scores the reference NLL."""
    from ..rl.scoring import Reference

    task = task_for(cfg.model)
    prompts = task.prompts(tokenizer, "eval", n)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    roll = sample(
        model, enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, eos_token_id=eos, blocked_token_ids=(eos,) if cfg.block_eos else (),
        pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed),
    )
    texts = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
    ref_logprobs = ref.logprobs(roll, cfg.temperature) if isinstance(ref, Reference) else response_logprobs(ref, roll, cfg.temperature)
    ref_nll = -(ref_logprobs * roll.response_mask).sum(-1) / roll.response_mask.sum(-1)
    proxy, gold = task.proxy(texts), task.gold(texts, ref_nll)
    return [
        {"prompt": p, "response": t, "reward": round(float(r), 3), "gold_reward": round(float(g), 3)}
        for p, t, r, g in zip(prompts, texts, proxy, gold)
    ]


def window_mean(history: list[dict], key: str, start: int, stop: int) -> float:
    values = [h[key] for h in history[start:stop] if h.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def summarise(history: list[dict], window: int | None = None) -> dict:
    """Start and end values (means over the first/last ``window`` steps) and the best gold."""
    n = len(history)
    window = window or max(1, n // 10)
    keys = ("reward", "gold_reward", "kl", "kl_seq", "kl_coef", "exclaim_rate", "distinct_2", "ref_nll", "entropy")
    start = {k: window_mean(history, k, 0, window) for k in keys}
    end = {k: window_mean(history, k, n - window, n) for k in keys}
    gold_curve = [window_mean(history, "gold_reward", i, i + window) for i in range(0, max(1, n - window + 1))]
    best = max((g for g in gold_curve if not math.isnan(g)), default=float("nan"))
    # one update's gold noise: the spread of step-to-step changes (a trend barely moves it), / sqrt 2
    golds = [float(h["gold_reward"]) for h in history if h.get("gold_reward") is not None]
    steps = [b - a for a, b in zip(golds, golds[1:])]
    noise = statistics.pstdev(steps) / math.sqrt(2) if len(steps) >= 2 else 0.0
    return {"steps": n, "window": window, "start": start, "end": end, "best_gold_reward": best, "gold_step_noise": noise}


def change(history: list[dict], key: str, window: int, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """How ``key`` moved from the first ``window`` updates to the last ``window``, and how sure that is.

    ``delta`` = mean of the last window's per-update values minus the first's.
    The 95% interval [``lo``, ``hi``] and ``p_up`` (the fraction of resamples
    with ``delta > 0``) come from a bootstrap over updates: each window's
    updates are resampled with replacement, so the interval carries the run's
    own update-to-update noise (sampling, reward and optimiser), nothing assumed.
    """
    values = [float(h[key]) for h in history if h.get(key) is not None]
    if len(values) < 2 * window:
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_up": float("nan"), "window": window}
    first = torch.tensor(values[:window], dtype=torch.float64)
    last = torch.tensor(values[-window:], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot_first = first[torch.randint(0, window, (n_boot, window), generator=g)].mean(1)
    boot_last = last[torch.randint(0, window, (n_boot, window), generator=g)].mean(1)
    deltas = boot_last - boot_first
    lo, hi = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta": float(last.mean() - first.mean()), "lo": lo, "hi": hi, "p_up": float((deltas > 0).double().mean()),
            "window": window}


def verdict(summary: dict, history: list[dict] | None = None) -> str:
    """A one-line reading of a run, from its measured numbers only, saying how sure it is.

    With ``history`` (one record per update), proxy and gold are compared over
    the first and last sixth of the run with a bootstrap over updates
    (:func:`change`): a move counts only when its 95% interval excludes 0, and
    a run whose intervals are wide and straddle 0 is "inconclusive", not "little
    change". Without it, the older point reading of ``summary`` alone.
    """
    s, e = summary["start"], summary["end"]
    d_reward = e["reward"] - s["reward"]
    gold_drop = summary["best_gold_reward"] - e["gold_reward"]
    # The best of many noisy window means sits above the end by chance: a drop counts only past
    # 0.1 and past twice the noise of a difference of two window means.
    margin = max(0.1, 2 * math.sqrt(2 / summary["window"]) * summary.get("gold_step_noise", 0.0))
    if e["kl"] < 0.01 and abs(d_reward) < 0.1:
        return "stuck near the reference: KL < 0.01 nats/token and the reward barely moved"
    if history is None:
        if d_reward > 0.1 and (e["gold_reward"] < s["gold_reward"] or gold_drop > margin):
            return "reward hacking: the proxy rose while the gold reward fell"
        if d_reward > 0.1:
            return "improving: proxy and gold reward rose with bounded KL"
        return "little change"
    window = max(3, len(history) // 6)  # a bootstrap over fewer than 3 updates a window understates the noise
    proxy, gold = change(history, "reward", window), change(history, "gold_reward", window)
    if math.isnan(proxy["delta"]) or math.isnan(gold["delta"]):
        return f"inconclusive: {len(history)} updates are too few to compare a first and a last {window}"

    def said(c):
        return f"{c['delta']:+.2f} (95% interval {c['lo']:+.2f} to {c['hi']:+.2f}, first vs last {c['window']} updates)"

    proxy_up, proxy_down = proxy["lo"] > 0, proxy["hi"] < 0
    gold_up, gold_down = gold["lo"] > 0, gold["hi"] < 0
    # A fall from a peak: the best `window`-update gold mean against the last one. The best of ~30 noisy windows
    # sits above the end by chance, so the fall must pass 3 standard deviations of a difference of two window
    # means (the bootstrap's interval / 3.92) and 0.1.
    golds = [float(h["gold_reward"]) for h in history if h.get("gold_reward") is not None]
    best = max(statistics.fmean(golds[i:i + window]) for i in range(len(golds) - window + 1))
    peak_drop = best - statistics.fmean(golds[-window:])
    peak_margin = max(0.1, 3 * (gold["hi"] - gold["lo"]) / 3.92)
    if proxy_up and (gold_down or peak_drop > peak_margin):
        why = f"gold {said(gold)}" if gold_down else (
            f"gold {peak_drop:.2f} below its best {window}-update window (margin {peak_margin:.2f})")
        return f"reward hacking: the proxy rose {said(proxy)} while the gold reward fell: {why}"
    if proxy_up and gold_up:
        return f"improving: proxy {said(proxy)} and gold {said(gold)} rose with bounded KL"
    if proxy_up:
        return f"proxy up, gold unclear: proxy {said(proxy)}, gold {said(gold)}"
    if proxy_down or gold_down:
        return f"getting worse: proxy {said(proxy)}, gold {said(gold)}"
    if max(proxy["hi"] - proxy["lo"], gold["hi"] - gold["lo"]) <= 0.2:
        return f"little change: proxy {said(proxy)}, gold {said(gold)}"
    return f"inconclusive (too noisy to tell): proxy {said(proxy)}, gold {said(gold)}"


def run_demo(
    cfg: TrainConfig = DEMO_CONFIG,
    *,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    show: bool = True,
) -> dict:
    """Train on the demo task; write the run folder; return the summary with samples."""
    from ..rl.lora import apply_lora
    from ..rl.scoring import Reference

    model, tokenizer, prompts, proxy, gold = demo_inputs(cfg)
    if cfg.lora_rank:  # the reference is the same weights with the adapters disabled
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        ref, ref_model = Reference(model), None
    else:
        ref_model = _frozen_copy(model)
        ref = Reference(model, ref_model)
    before = show_samples(model, ref, tokenizer, cfg) if show else []
    # alerts still print (one line each, via the klbelt.monitor logger) and land in metrics.jsonl
    history = train(
        cfg, model, tokenizer, prompts, proxy, gold_fn=gold, ref_policy=ref_model, resume=resume, on_step=on_step, warn_alerts=False
    )
    from ..rl.io import read_jsonl

    full = read_jsonl(Path(cfg.out) / "metrics.jsonl") if resume else history
    summary = summarise(full)
    summary["verdict"] = verdict(summary, full)
    summary["before"] = before
    summary["after"] = show_samples(model, ref, tokenizer, cfg) if show else []
    if show:
        from .english import english_word_share

        summary["english_share"] = {when: english_word_share([smp["response"] for smp in summary[when]])
                                    for when in ("before", "after")}
    save_pretrained_atomic(_plain(model), tokenizer, Path(cfg.out) / "policy")
    atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _plain(model):
    """A plain transformers model to save: LoRA adapters merged into a copy of the base weights."""
    import copy

    from ..rl.hf import is_lora

    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


def _frozen_copy(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def run_sweep(
    betas: list[float],
    seeds: int,
    out: str,
    base: TrainConfig = DEMO_CONFIG,
    on_run: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fixed-beta runs of the demo task, one per (beta, seed); the article's beta table, measured."""
    rows = []
    for beta in betas:
        for seed in range(seeds):
            cfg = replace(base, controller="fixed", kl_coef=beta, seed=seed, out=str(Path(out) / f"beta{beta:g}-seed{seed}"))
            summary = run_demo(cfg, on_step=on_step, show=False)
            e = summary["end"]
            row = {
                "beta": beta,
                "seed": seed,
                "reward": e["reward"],
                "gold_reward": e["gold_reward"],
                "kl": e["kl"],
                "kl_seq": e["kl_seq"],
                "exclaim_rate": e["exclaim_rate"],
                "distinct_2": e["distinct_2"],
                "start_reward": summary["start"]["reward"],
                "start_gold_reward": summary["start"]["gold_reward"],
                "best_gold_reward": summary["best_gold_reward"],
                "verdict": summary["verdict"],
                "run_dir": cfg.out,
            }
            rows.append(row)
            if on_run:
                on_run(row)
    return rows
