"""Measure what the gold reward's constants rest on: ``python -m klbelt.demo.calibrate [MODEL_DIR]``.

Prints, for natural text, for the reference model's own samples and for constructed degenerate
texts: distinct-1 within a sample, sentiment-word density, reference NLL per token, the proxy
and gold rewards. Natural text = the 32 tokens after the 6-token demo prompt of every eval-split
fortune that long; reference samples = 32 tokens at temperature 1 from those prompts,
end-of-text blocked (as in the RL demo).

Measured on the shipped model (validation loss 4.289), torch 2.13 CPU::

    natural continuations, eval split (n=286): quantiles 1% / 5% / 50% / 95% / 99%
      distinct_1  0.684 / 0.780 / 0.941 / 1.000 / 1.000
      density     0.000 / 0.000 / 0.050 / 0.150 / 0.200
      ref_nll     3.321 / 3.667 / 4.354 / 4.929 / 5.252
      quality<1 in 4 of 286; mean proxy +0.087, mean normalised sentiment +0.082, mean gold +0.079
    reference-model samples, temperature 1 (n=286): quantiles 1% / 5% / 50% / 95% / 99%
      distinct_1  0.774 / 0.843 / 1.000 / 1.000 / 1.000
      density     0.000 / 0.000 / 0.000 / 0.100 / 0.150
      ref_nll     3.623 / 3.824 / 4.415 / 5.001 / 5.270
      quality<1 in 4 of 286; mean proxy +0.028, mean normalised sentiment +0.027, mean gold +0.026
    constructed degenerate texts (prompt: the first eval prompt)
      repeated word    proxy +0.998  gold -1.000  (s +0.637, distinct 0.05, density 1.00, nll 8.48)
      exclaimed word   proxy +0.993  gold -1.000  (s +0.625, distinct 0.10, density 0.50, nll 9.31)
      positive salad   proxy +0.997  gold -1.000  (s +0.997, distinct 1.00, density 1.00, nll 5.31)
      stuffed sentence proxy +0.992  gold -1.000  (s +0.991, distinct 0.87, density 0.57, nll 4.83)
      short loop       proxy +0.980  gold -1.000  (s +0.637, distinct 0.24, density 0.29, nll 6.03)
      caps and marks   proxy +0.975  gold +0.062  (s +0.919, distinct 0.57, density 0.25, nll 3.70)
"""

from __future__ import annotations

import sys

import torch

from .corpus import load_fortunes
from .model import load_demo_model
from .rewards import TINY_JUDGE, GoldJudge, gold_parts, proxy_reward, sequence_nll

PROMPT_TOKENS, NEW_TOKENS = 6, 32

DEGENERATE = {
    "repeated word": "love love love love love love love love love love love love love love love love love love love love",
    "exclaimed word": "great! great!! great!!! great!!!! great! great!! great!!! great!!!! great! great!!",
    "positive salad": "love happy great wonderful best good nice beautiful joy amazing excellent fun kind sweet win "
    "perfect glad smile hope friend",
    "stuffed sentence": "the best love is a great happy friend and a wonderful good kind of beautiful joy that "
    "you love with a nice smile",
    "short loop": "i love you and you love me i love you and you love me i love you and you love me",
    "caps and marks": "I LOVE IT!!!! I LOVE IT!!!! THIS IS GREAT!!!! SO GOOD!!!! I LOVE IT!!!!",
}


@torch.no_grad()
def ref_nll_of(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 64) -> torch.Tensor:
    """Reference NLL per token of each continuation given its prompt (temperature 1), [B].
    Sequences are right-padded, so every real token keeps its position."""
    out = []
    for i in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, c in zip(prompts[i : i + batch_size], continuations[i : i + batch_size]):
            p_ids = tokenizer.encode(p, add_special_tokens=False)
            c_ids = tokenizer.encode(c, add_special_tokens=False)
            ids = (p_ids + c_ids)[: getattr(model.config, "n_positions", None) or model.config.max_position_embeddings]
            rows.append(ids)
            spans.append((len(p_ids), len(ids)))
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.zeros_like(lp)
        for b, (start, stop) in enumerate(spans):
            mask[b, start - 1 : stop - 1] = 1  # logits at t predict token t + 1
        out.append(sequence_nll(lp, mask))
    return torch.cat(out)


def _summary(name: str, rows: list[dict], proxy: torch.Tensor) -> None:
    def q(key, p):
        return torch.tensor([r[key] for r in rows], dtype=torch.float64).quantile(p).item()

    print(f"\n{name} (n={len(rows)}): quantiles 1% / 5% / 50% / 95% / 99%")
    for key in ("distinct_1", "density", "ref_nll"):
        if rows[0][key] is not None:
            print(f"  {key:11s} " + " / ".join(f"{q(key, p):.3f}" for p in (0.01, 0.05, 0.5, 0.95, 0.99)))
    print(f"  quality<1 in {sum(r['quality'] < 1 for r in rows)} of {len(rows)}; "
          f"mean proxy {proxy.mean():+.3f}, mean normalised sentiment "
          f"{sum(r['sentiment'] for r in rows) / len(rows):+.3f}, mean gold {sum(r['gold'] for r in rows) / len(rows):+.3f}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model, tok = load_demo_model(argv[0] if argv else None)
    torch.manual_seed(0)
    prompts, natural = [], []
    for entry in load_fortunes("eval"):
        ids = tok.encode(entry, add_special_tokens=False)
        if entry[0].isalpha() and len(ids) >= PROMPT_TOKENS + NEW_TOKENS:
            prompts.append(tok.decode(ids[:PROMPT_TOKENS]))
            natural.append(tok.decode(ids[PROMPT_TOKENS : PROMPT_TOKENS + NEW_TOKENS]))
    nll = ref_nll_of(model, tok, prompts, natural)
    rows = [gold_parts(t, float(v)) for t, v in zip(natural, nll)]
    _summary("natural continuations, eval split", rows, proxy_reward(natural))

    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gen = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         pad_token_id=tok.pad_token_id, suppress_tokens=[tok.eos_token_id])
    samples = tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    nll_s = ref_nll_of(model, tok, prompts, samples)
    rows_s = [gold_parts(t, float(v)) for t, v in zip(samples, nll_s)]
    _summary("reference-model samples, temperature 1", rows_s, proxy_reward(samples))

    print("\nconstructed degenerate texts (prompt: the first eval prompt)")
    print_degenerate(model, tok, prompts[0], DEGENERATE)
    return 0


def print_degenerate(model, tokenizer, prompt: str, texts: dict[str, str], judge: GoldJudge = TINY_JUDGE) -> None:
    """One line per constructed text: proxy, gold and every term of the gold, its NLL given ``prompt``."""
    nll = ref_nll_of(model, tokenizer, [prompt] * len(texts), [" " + t for t in texts.values()])
    for (name, text), v in zip(texts.items(), nll):
        r = gold_parts(text, float(v), judge)
        print(f"  {name:16s} proxy {proxy_reward([text])[0]:+.3f}  gold {r['gold']:+.3f}  "
              f"(s {r['sentiment']:+.3f}, distinct {r['distinct_1']:.2f}, density {r['density']:.2f}, "
              f"nll {float(v):.2f}; q {r['q_distinct']:.2f}*{r['q_density']:.2f}*{r['q_fluency']:.2f})")


if __name__ == "__main__":
    raise SystemExit(main())
