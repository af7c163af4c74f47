"""``klbelt bon``: best-of-n on the demo task, proxy and gold reward against KL (nats per sequence).

One pool of samples per prompt is drawn from the reference model (the demo
task's sampling settings); for each n, best-of-n from that pool is computed
exactly (no resampling): the expected proxy and gold reward of the kept
response, its KL to the pool (ties in the proxy included; biased low as n
approaches the pool size) and the analytic bound log n - (n-1)/n.
The prompts default to the training split: the prompts an RL run's logged
kl_seq and gold_reward are measured on, so both sit on one axis.
Writes OUT/bon.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _ns(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n must be comma-separated integers >= 1, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--n must be comma-separated integers >= 1, got {text!r}")
    return sorted(set(values))


def add_parser(sub) -> None:
    p = sub.add_parser("bon", help="best-of-n on the demo task: proxy and gold reward vs KL (nats/sequence)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local Hugging Face causal-LM directory")
    p.add_argument("--n", type=_ns, default=DEFAULT_NS, help="comma-separated n (default: 1,2,4,...,256)")
    p.add_argument("--prompts", type=int, default=16, help="prompts, the first of the split (default: 16)")
    p.add_argument("--split", choices=("train", "eval"), default="train",
                   help="prompt split (default: train, the prompts whose kl_seq and gold_reward RL runs log)")
    p.add_argument("--pool", type=int, default=None, help="samples per prompt (default: 2 x the largest n)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--out", default="runs/bon", help="output directory (default: runs/bon)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bon import pool_curve, sample_pool
    from ..demo.models import load_model
    from ..demo.task import task_for
    from ..rl.io import atomic_write_text

    pool = args.pool or 2 * max(args.n)
    if args.prompts < 1:
        print(f"klbelt bon: error: --prompts must be >= 1, got {args.prompts}", file=sys.stderr)
        return 2
    if pool < max(args.n):
        print(f"klbelt bon: error: --pool ({pool}) must be >= the largest n ({max(args.n)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = task_for(args.model)
    cfg = task.config
    model, tokenizer = load_model(cfg.model)
    prompts = task.prompts(tokenizer, args.split, args.prompts)
    print(f"klbelt bon: {cfg.model} ({task.name} task), {len(prompts)} {args.split} prompts x {pool} samples of "
          f"{cfg.max_new_tokens} tokens, n = {','.join(map(str, args.n))}", flush=True)
    t0 = time.perf_counter()
    _, proxy, gold = sample_pool(model, tokenizer, prompts, pool, task.proxy, task.gold, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, block_eos=cfg.block_eos, seed=args.seed)
    rows = pool_curve(proxy, gold, args.n)
    seconds = time.perf_counter() - t0
    result = {
        "model": cfg.model,
        "task": task.name,
        "prompts": len(prompts),
        "split": args.split,
        "temperature": cfg.temperature,
        "pool": pool,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": args.seed,
        "kl_unit": "nats/sequence",
        "rows": rows,
    }
    atomic_write_text(out / "bon.json", json.dumps(result, indent=2) + "\n")
    print(f"{'n':>5} {'KL (pool)':>10} {'KL bound':>9} {'reward':>8} {'gold':>8}   KL in nats/sequence")
    for r in rows:
        print(f"{r['n']:>5} {r['kl_nats_per_seq']:>10.3f} {r['kl_bound_nats_per_seq']:>9.3f} "
              f"{r['reward']:>+8.3f} {r['gold_reward']:>+8.3f}")
    print(f"\nWrote {out / 'bon.json'} ({seconds:.0f} s)")
    return 0
