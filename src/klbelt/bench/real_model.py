"""``klbelt bench trainer --model smollm2``: one update of the English demo, klbelt against TRL's GRPOTrainer and the floor.

The work is the English demo's (``klbelt.demo.task.ENGLISH_DEMO_CONFIG``): SmolLM2-135M-Instruct,
16 sequences per update (4 prompts x 4 samples), 24 response tokens at temperature 1 (full
length), LoRA rank 16 on every attention and MLP projection (peft), the reference = the same
weights with the adapters disabled, a group baseline (no critic), VADER as the reward, beta 0.1
fixed, one AdamW step per update. Every measurement runs in a fresh process with ``--threads``
threads; sides alternate run by run. The time of an update runs from the end of the update
before it to its own end (median over every timed update of every run); tokens/s = 16 x 24 /
that time. ``peak_rss_mb`` is the process's resident high-water mark (ru_maxrss), model included.

* klbelt: ``klbelt.rl.train`` with the demo config (bf16 autocast on the trained pass where the
  CPU supports it; sampling and the reference pass in fp32, where they measured faster or exact).
* TRL ``GRPOTrainer``: the same model, LoRA config, prompts, reward, batch (``num_generations=4``,
  ``per_device_train_batch_size=16``), ``max_completion_length=24`` with ``min_new_tokens=24``,
  ``beta=0.1`` (TRL then scores the reference with the adapters disabled, like klbelt), the same
  learning rate, ``bf16`` as klbelt's, no gradient checkpointing, no logging or saving. It runs
  with the TRL installed here (``--trl-python`` runs it under another interpreter, e.g. a venv
  holding the newest TRL).
* The floor: the passes no such update can avoid, each timed alone on the same modules
  (median of ``--floor-repeats``): generation (a KV-cached loop, fp32), one reference forward
  (adapters off, fp32), one policy forward+backward (bf16 autocast where klbelt uses it) and
  one AdamW step on the adapters.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

RESULT_MARK = "KLBELT_BENCH_RESULT "
TOKENS = 16 * 24


class _Stop(Exception):
    pass


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(spec: dict):
    from dataclasses import replace

    import torch

    from klbelt.demo.english import english_prompts
    from klbelt.demo.models import load_model
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG

    torch.manual_seed(0)
    model, tok = load_model(spec["model"])
    cfg = replace(ENGLISH_DEMO_CONFIG, model=spec["model"], controller="fixed", kl_coef=0.1, bf16=spec["bf16"],
                  steps=spec["warmup"] + spec["updates"] + 1, checkpoint_every=10**9, samples_every=10**9)
    return model, tok, english_prompts("train"), cfg


def _intervals(ends: list[float], warmup: int) -> list[float]:
    timed = ends[warmup - 1 :]
    return [b - a for a, b in zip(timed, timed[1:])]


def child_klbelt(spec: dict) -> dict:
    import tempfile
    from dataclasses import replace

    from klbelt.demo.rewards import proxy_reward
    from klbelt.rl.trainer import train

    model, tok, prompts, cfg = _setup(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    def on_step(record):
        ends.append(time.perf_counter())
        if len(ends) == total:
            raise _Stop

    with tempfile.TemporaryDirectory() as out:
        try:
            train(replace(cfg, out=out), model, tok, prompts, proxy_reward, on_step=on_step, warn_alerts=False)
        except _Stop:
            pass
    return {"intervals": _intervals(ends, spec["warmup"]), "peak_rss_mb": _peak_rss_mb()}


def child_trl(spec: dict) -> dict:
    import tempfile
    import warnings

    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from klbelt.demo.rewards import proxy_reward
    from klbelt.rl.lora import LORA_TARGETS, linear_module_names

    warnings.filterwarnings("ignore")
    model, tok, prompts, cfg = _setup(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def vader(completions, **kwargs):
        return proxy_reward(list(completions)).tolist()

    targets = [t for t in LORA_TARGETS if t in linear_module_names(model)]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets, lora_dropout=0.0, bias="none")
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, seed=0, use_cpu=True, bf16=spec["bf16"], fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=cfg.batch_size, num_generations=cfg.group_size, gradient_accumulation_steps=1,
            max_completion_length=cfg.max_new_tokens, generation_kwargs={"min_new_tokens": cfg.max_new_tokens},
            temperature=cfg.temperature, beta=cfg.kl_coef, learning_rate=cfg.lr, max_steps=total, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[vader], args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=tok, peft_config=lora, callbacks=[Clock()])
        trainer.train()
    if len(ends) != total:
        raise RuntimeError(f"TRL ran {len(ends)} updates, expected {total}")
    return {"intervals": _intervals(ends, spec["warmup"]), "peak_rss_mb": _peak_rss_mb(), "trl_version": trl.__version__}


def child_floor(spec: dict) -> dict:
    import torch

    from klbelt.kl import logprobs_from_logits
    from klbelt.rl.lora import adapters_disabled, apply_lora, autocast
    from klbelt.rl.rollout import _cache_kwarg, _returned_cache, position_ids

    model, tok, prompts, cfg = _setup(spec)
    policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    batch = [p for p in prompts[: cfg.batch_size // cfg.group_size] for _ in range(cfg.group_size)]
    enc = tok(batch, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, P, R = ids.shape[0], ids.shape[1], cfg.max_new_tokens
    gen = torch.Generator().manual_seed(0)
    base = policy.get_base_model()
    cache_kw = _cache_kwarg(base)

    @torch.no_grad()
    def generate():
        m = mask
        out = policy(input_ids=ids, attention_mask=m, position_ids=position_ids(m), use_cache=True)
        pos = position_ids(m)[:, -1:] + 1
        tokens = []
        for step in range(R):
            token = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=gen)
            tokens.append(token)
            if step + 1 == R:
                break
            m = torch.cat([m, m.new_ones(B, 1)], 1)
            out = policy(input_ids=token, attention_mask=m, position_ids=pos, use_cache=True, **{cache_kw: _returned_cache(out)})
            pos = pos + 1
        return torch.cat([ids] + tokens, 1)

    seq = generate()
    full = torch.cat([mask, mask.new_ones(B, R)], 1)
    pos_full = position_ids(full)
    responses = seq[:, P:]

    @torch.no_grad()
    def ref_forward():
        with adapters_disabled(policy) as ref:
            return ref(input_ids=seq, attention_mask=full, position_ids=pos_full, logits_to_keep=R + 1).logits

    def policy_fb():
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", cfg.bf16):
            logits = policy(input_ids=seq, attention_mask=full, position_ids=pos_full, logits_to_keep=R + 1).logits
        logprobs_from_logits(logits[:, :-1], responses).mean().backward()

    policy_fb()
    passes = {"generation": generate, "ref_forward": ref_forward, "policy_forward_backward": policy_fb, "optimizer_step": opt.step}
    times: dict[str, list[float]] = {name: [] for name in passes}
    for round_ in range(1 + spec["floor_repeats"]):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= 1:
                times[name].append(time.perf_counter() - t0)
    parts = {name: statistics.median(ts) for name, ts in times.items()}
    return {"seconds_per_update": sum(parts.values()), "parts": parts, "peak_rss_mb": _peak_rss_mb()}


def child_memory(spec: dict) -> dict:
    """One update of ``memory_batch`` x ``memory_tokens`` with the fused head on or off: peak RSS growth over the loaded model."""
    import tempfile
    from dataclasses import replace

    from klbelt.demo.rewards import proxy_reward
    from klbelt.rl.trainer import train

    model, tok, prompts, cfg = _setup(spec)
    base_mb = _peak_rss_mb()
    cfg = replace(cfg, steps=1, batch_size=spec["memory_batch"], max_new_tokens=spec["memory_tokens"], fused_head=spec["fused"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(replace(cfg, out=out), model, tok, prompts, proxy_reward, warn_alerts=False)
    return {"peak_rss_mb": _peak_rss_mb(), "loaded_rss_mb": base_mb, "seconds": time.perf_counter() - t0}


CHILDREN = {"klbelt": child_klbelt, "trl": child_trl, "floor": child_floor, "memory": child_memory}


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
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run([python or sys.executable, "-m", "klbelt.bench.real_model", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark process ({spec['side']}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def run(args) -> int:
    """The parent: alternate klbelt and TRL runs, then the floor; print the table (or JSON)."""
    from klbelt.rl.lora import bf16_supported

    spec = dict(model=args.model, warmup=args.warmup, updates=args.updates, threads=args.threads,
                floor_repeats=args.floor_repeats, bf16=bool(bf16_supported()))
    sides = ["klbelt"] if args.no_trl else ["klbelt", "trl"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.runs):
        for side in sides if r % 2 == 0 else sides[::-1]:
            results[side].append(_measure(dict(spec, side=side), args.trl_python if side == "trl" else None))
    floor = _measure(dict(spec, side="floor"))

    def seconds(side):
        pooled = [x for r in results.get(side, []) for x in r["intervals"]]
        return statistics.median(pooled) if pooled else None

    k_s, t_s, f_s = seconds("klbelt"), seconds("trl"), floor["seconds_per_update"]
    row = {
        "model": args.model, "work": "16 x 24 tokens, LoRA r16, group baseline (4 x 4), beta 0.1, 1 AdamW step",
        "bf16": spec["bf16"], "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "updates": args.updates,
        "klbelt_s_per_update": k_s, "trl_grpo_s_per_update": t_s, "floor_s_per_update": f_s,
        "klbelt_tokens_per_s": TOKENS / k_s, "trl_grpo_tokens_per_s": TOKENS / t_s if t_s else None,
        "floor_tokens_per_s": TOKENS / f_s, "speedup_vs_trl_grpo": t_s / k_s if t_s else None, "floor_ratio": k_s / f_s,
        "floor_parts_s": floor["parts"],
        "klbelt_peak_rss_mb": max(r["peak_rss_mb"] for r in results["klbelt"]),
        "trl_grpo_peak_rss_mb": max(r["peak_rss_mb"] for r in results["trl"]) if "trl" in results else None,
        "trl_version": results["trl"][0]["trl_version"] if "trl" in results else None,
        "targets": {"klbelt_s_per_update": "<= 4", "speedup_vs_trl_grpo": ">= 1.5", "floor_ratio": "<= 1.2", "klbelt_peak_rss_mb": "<= 2048"},
        "load_average": os.getloadavg()[0],
    }
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(json.dumps([row], indent=1) + "\n")
    if args.json:
        print(json.dumps([row], indent=1))
        return 0
    print(f"English demo update on {args.model}: {row['work']}; {args.threads} thread(s), bf16 autocast {'on' if spec['bf16'] else 'off'}; "
          f"median over {args.runs} run(s) x {args.updates} timed updates (after {args.warmup} warm-up)")
    print(f"{'':<22}{'s/update':>10}{'tokens/s':>10}{'peak RSS MB':>13}")
    print(f"{'klbelt':<22}{k_s:>10.2f}{TOKENS / k_s:>10.1f}{row['klbelt_peak_rss_mb']:>13.0f}")
    if t_s:
        print(f"{'TRL ' + row['trl_version'] + ' GRPOTrainer':<22}{t_s:>10.2f}{TOKENS / t_s:>10.1f}{row['trl_grpo_peak_rss_mb']:>13.0f}")
    print(f"{'floor':<22}{f_s:>10.2f}{TOKENS / f_s:>10.1f}")
    ratio = f"{row['speedup_vs_trl_grpo']:.2f}x" if t_s else "-"
    print(f"klbelt vs TRL GRPO: {ratio}; klbelt / floor: {row['floor_ratio']:.2f}x; floor parts (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in floor["parts"].items()))
    print(f"load average at the end: {row['load_average']:.2f}")
    return 0


if __name__ == "__main__":
    import torch

    _spec = json.loads(sys.argv[1])
    torch.set_num_threads(_spec["threads"])
    _result = CHILDREN[_spec["side"]](_spec)
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(_result), flush=True)
