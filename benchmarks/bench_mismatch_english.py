"""The KL belt with a sampler that is not the policy, on the English model (SmolLM2-135M-Instruct, LoRA).

The English demo's config (``klbelt.demo.task.ENGLISH_DEMO_CONFIG``: LoRA rank 16,
bf16 autocast for the trainer's passes, group baseline, PID on k1 in the reward)
with ``sampler`` and ``rollout_correction`` overridden, a few updates per run.
Every update records the KL the controller is fed (``kl``: the trainer's
estimate from the sampled tokens, importance-weighted under ``tis``), the
*exact* trainer-side KL(pi || ref) (the full-vocabulary KL per token,
``kl_from_logits``, of the policy against the reference, adapters off, at the
positions of a fresh fp32 sample from the policy on fixed held-out prompts,
measured on the policy the controller's KL was measured on), and the
mismatch metrics the trainer logs. Prints a markdown table of medians over the
second half of each run and writes every record to ``--json``.

    KLBELT_VLLM_PYTHON=/work/venv-vllm/bin/python flock /tmp/heavy.lock \\
        python benchmarks/bench_mismatch_english.py --steps 6 --runs bf16:off,vllm:off,vllm:tis,bf16:tis
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from klbelt.demo.task import ENGLISH_DEMO_CONFIG, demo_inputs, task_for
from klbelt.kl import kl_from_logits
from klbelt.rl.lora import adapters_disabled, apply_lora
from klbelt.rl.rollout import response_logits, sample
from klbelt.rl.trainer import train

KEYS = ("kl", "mismatch_kl", "mismatch_k3", "mismatch_max_logratio", "is_weight_mean", "is_weight_min", "is_weight_max",
        "is_clipped_frac", "kl_coef", "reward", "gold_reward", "seconds")


@torch.no_grad()
def exact_kl(policy, tokenizer, prompts, cfg, seed=1234) -> float:
    """Exact KL(pi || ref) per token (nats/token; ref = adapters off), averaged over a fresh fp32 sample from pi."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    u = torch.rand(len(prompts), cfg.max_new_tokens, generator=torch.Generator().manual_seed(seed))
    eos = tokenizer.eos_token_id
    roll = sample(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  eos_token_id=eos, blocked_token_ids=(eos,) if cfg.block_eos else (), pad_token_id=tokenizer.pad_token_id, uniforms=u)
    pi = response_logits(policy, roll)
    with adapters_disabled(policy) as ref:
        ref_logits = response_logits(ref, roll)
    kl = kl_from_logits(pi, ref_logits, temperature=cfg.temperature)
    mask = roll.response_mask
    return float((kl * mask).sum() / mask.sum())


def run(sampler: str, correction: str, steps: int, eval_prompts: int) -> dict:
    cfg = replace(ENGLISH_DEMO_CONFIG, steps=steps, sampler=sampler, rollout_correction=correction, checkpoint_every=10**6,
                  samples_every=10**6, out=tempfile.mkdtemp(prefix=f"klbelt-mismatch-en-{sampler}-{correction}-"))
    model, tokenizer, prompts, proxy, gold = demo_inputs(cfg)
    policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha)  # the trainer keeps it; the reference is adapters off
    tokenizer.padding_side = "left"
    held = task_for(cfg.model).prompts(tokenizer, "eval", eval_prompts)
    exact = [exact_kl(policy, tokenizer, held, cfg)]  # the policy of update 0

    def on_step(record):
        exact.append(exact_kl(policy, tokenizer, held, cfg))  # the policy of the next update

    t0 = time.perf_counter()
    history = train(cfg, policy, tokenizer, prompts, proxy, gold_fn=gold, on_step=on_step, warn_alerts=False)
    seconds = time.perf_counter() - t0
    records = [{**{k: r.get(k) for k in KEYS}, "exact_kl": e} for r, e in zip(history, exact)]
    half = records[steps // 2:]
    med = lambda key: statistics.median(r[key] for r in half)  # noqa: E731
    return {
        "run": f"{sampler} sampler, correction {correction}",
        "kl_seen": med("kl"),
        "kl_exact": med("exact_kl"),
        "gap": statistics.median(r["kl"] - r["exact_kl"] for r in half),
        "mismatch_kl": med("mismatch_kl"),
        "mismatch_k3": med("mismatch_k3"),
        "mismatch_max": med("mismatch_max_logratio"),
        "w_mean": med("is_weight_mean"),
        "w_min": min(r["is_weight_min"] for r in half),
        "w_max": max(r["is_weight_max"] for r in half),
        "clipped": med("is_clipped_frac"),
        "s_per_step": seconds / steps,
        "records": records,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--runs", default="bf16:off,bf16:tis,vllm:off,vllm:tis", help="sampler:correction pairs")
    p.add_argument("--json", default=None, help="write every run's per-update records here")
    args = p.parse_args()
    print(f"English demo (SmolLM2-135M-Instruct, LoRA {ENGLISH_DEMO_CONFIG.lora_rank}), {args.steps} updates, medians over "
          f"updates {args.steps // 2}-{args.steps - 1}; target_kl {ENGLISH_DEMO_CONFIG.target_kl} nats/token (PID)\n")
    print("| run | KL the controller sees | exact KL(pi\\|\\|ref) | seen - exact | mismatch KL(mu\\|\\|pi) k1 | k3 | "
          "max abs log-ratio | IS weight mean [min, max] | TIS clipped | s/update |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for pair in args.runs.split(","):
        r = run(*pair.split(":"), args.steps, args.eval_prompts)
        results.append(r)
        print(f"| {r['run']} | {r['kl_seen']:.4f} | {r['kl_exact']:.4f} | {r['gap']:+.4f} | {r['mismatch_kl']:.1e} | "
              f"{r['mismatch_k3']:.1e} | {r['mismatch_max']:.3f} | {r['w_mean']:.3f} [{r['w_min']:.2f}, {r['w_max']:.2f}] | "
              f"{r['clipped']:.4f} | {r['s_per_step']:.1f} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
