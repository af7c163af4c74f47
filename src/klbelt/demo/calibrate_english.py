"""Measure what the English gold reward's thresholds rest on: ``python -m klbelt.demo.calibrate_english [MODEL]``.

For SmolLM2-135M-Instruct's own samples on the shipped English openings (24 tokens at
temperature 1, end-of-text blocked, as in the RL demo) and for constructed degenerate texts,
prints distinct-1 within a sample, sentiment-word density, reference NLL per token, proxy and
gold. There is no natural English corpus in the package: the reference model's own samples are
the "natural" text a policy starts from. The measured figures are in ``ENGLISH_JUDGE``'s comments.
"""

from __future__ import annotations

import sys

import torch

from ..rl.sampling import sample
from ..rl.scoring import response_logprobs
from .calibrate import DEGENERATE, _summary, print_degenerate
from .english import ENGLISH_JUDGE, english_prompts
from .models import load_model
from .rewards import gold_parts, proxy_reward

NEW_TOKENS = 24

DEGENERATE_ENGLISH = {
    **DEGENERATE,
    "exclaimed praise": "Great!!!! Amazing!!!! Wonderful!!!! Great!!!! Amazing!!!! Wonderful!!!! Great!!!!",
    "praise on repeat": "and it was great. and it was great. and it was great. and it was great. and it was great.",
    "upbeat but plain": "and we all had a wonderful time together, laughing and sharing stories about the best days of our lives.",
}


@torch.no_grad()
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model, tok = load_model(argv[0] if argv else "smollm2")
    prompts = english_prompts("train") + english_prompts("eval")
    texts, nll = [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(prompts), 32):
        enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True)
        roll = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                      blocked_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, generator=gen)
        texts += tok.batch_decode(roll.responses, skip_special_tokens=True)
        lp = response_logprobs(model, roll)
        nll.append(-(lp * roll.response_mask).sum(-1) / roll.response_mask.sum(-1))
    nll = torch.cat(nll)
    rows = [gold_parts(t, float(v), ENGLISH_JUDGE) for t, v in zip(texts, nll)]
    _summary("reference-model samples, temperature 1", rows, proxy_reward(texts))
    print("\nconstructed degenerate texts (prompt: the first eval opening)")
    print_degenerate(model, tok, english_prompts("eval")[0], DEGENERATE_ENGLISH, ENGLISH_JUDGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
