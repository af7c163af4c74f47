"""The KL belt with a sampler that is not the policy: the demo task sampled in bf16, trained in fp32.

For each run (fp32 policy sampler; bf16 sampler uncorrected; bf16 sampler with
TIS) it records, every update, the KL the controller is fed (``kl``, the
trainer's estimate from the rollouts) and the *exact* trainer-side
KL(pi || ref): the full-vocabulary KL per token (``kl_from_logits``) of the
policy against the reference at the positions of a fresh fp32 sample from
the policy (fixed prompts and uniforms), measured on the policy the
controller's KL was measured on. Prints a markdown table of medians over
the second half of each run.

    nice -n 15 python benchmarks/bench_mismatch.py --steps 16 --eval-prompts 32 --runs bf16:off,bf16:tis
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from klbelt.demo.task import DEMO_CONFIG, demo_inputs
from klbelt.kl import kl_from_logits
from klbelt.rl.rollout import response_logits, sample
from klbelt.rl.trainer import train

RUNS = (("policy", "off"), ("bf16", "off"), ("bf16", "tis"))


@torch.no_grad()
def exact_kl(policy, ref, tokenizer, prompts, cfg, seed=1234) -> float:
    """Exact KL(pi || ref) per token (nats/token), averaged over a fresh fp32 sample from pi."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    u = torch.rand(len(prompts), cfg.max_new_tokens, generator=torch.Generator().manual_seed(seed))
    eos = tokenizer.eos_token_id
    roll = sample(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  eos_token_id=eos, blocked_token_ids=(eos,) if cfg.block_eos else (), pad_token_id=tokenizer.pad_token_id, uniforms=u)
    kl = kl_from_logits(response_logits(policy, roll), response_logits(ref, roll), temperature=cfg.temperature)
    mask = roll.response_mask
    return float((kl * mask).sum() / mask.sum())


def run(sampler: str, correction: str, steps: int, eval_prompts: int) -> dict:
    cfg = replace(DEMO_CONFIG, steps=steps, sampler=sampler, rollout_correction=correction, checkpoint_every=10**6,
                  samples_every=10**6, out=tempfile.mkdtemp(prefix=f"klbelt-mismatch-{sampler}-{correction}-"))
    model, tokenizer, prompts, proxy, gold = demo_inputs(cfg)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    held = prompts[-eval_prompts:]
    exact = [exact_kl(model, ref, tokenizer, held, cfg)]  # the policy of update 0

    def on_step(record):
        exact.append(exact_kl(model, ref, tokenizer, held, cfg))  # the policy of the next update

    t0 = time.perf_counter()
    history = train(cfg, model, tokenizer, prompts, proxy, gold_fn=gold, ref_policy=ref, on_step=on_step, warn_alerts=False)
    seconds = time.perf_counter() - t0
    half = history[steps // 2 :]
    med = lambda key: statistics.median(r.get(key, float("nan")) for r in half)  # noqa: E731
    seen = [r["kl"] for r in history]
    gap = [s - e for s, e in zip(seen, exact)][steps // 2 :]
    return {
        "run": f"{sampler} sampler, correction {correction}",
        "kl_seen": med("kl"),
        "kl_exact": statistics.median(exact[steps // 2 : steps]),
        "gap": statistics.median(gap),
        "mismatch_kl": med("mismatch_kl"),
        "mismatch_max": med("mismatch_max_logratio"),
        "clipped": med("is_clipped_frac"),
        "beta": history[-1]["next_kl_coef"] if "next_kl_coef" in history[-1] else history[-1]["kl_coef"],
        "gold": med("gold_reward"),
        "s_per_step": seconds / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--runs", default=",".join(f"{s}:{c}" for s, c in RUNS), help="sampler:correction pairs")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"demo task, {args.steps} updates, medians over updates {args.steps // 2}-{args.steps - 1}; "
          f"target_kl {DEMO_CONFIG.target_kl} nats/token (PID)\n")
    print("| run | KL the controller sees | exact KL(pi||ref) | seen - exact | mismatch KL(mu||pi) | max abs log-ratio | clipped | final beta | gold | s/update |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for pair in args.runs.split(","):
        r = run(*pair.split(":"), args.steps, args.eval_prompts)
        print(f"| {r['run']} | {r['kl_seen']:.4f} | {r['kl_exact']:.4f} | {r['gap']:+.4f} | {r['mismatch_kl']:.2e} | {r['mismatch_max']:.3f} | "
              f"{r['clipped']:.4f} | {r['beta']:.3f} | {r['gold']:.3f} | {r['s_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
