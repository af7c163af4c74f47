"""Measure what the gold reward's constants rest on: ``python -m klbelt.demo.calibrate [MODEL_DIR]``.

Prints, for natural text, for the reference model's own samples and for constructed degenerate
texts: distinct-1 within a sample, sentiment-word density, reference NLL per token, the proxy
and gold rewards. Natural text = the 32 tokens after the 6-token demo prompt of every eval-split
fortune that long; reference samples = 32 tokens at temperature 1 from those prompts,
end-of-text blocked (as in the RL demo).
"""

from __future__ import annotations

import sys

import torch

from .corpus import load_fortunes
from .model import load_demo_model
from .rewards import gold_parts, proxy_reward, sequence_nll

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
def ref_nll_of(model, tokenizer, prompts: list[str], continuations: list[str]) -> torch.Tensor:
    """Reference NLL per token of each continuation given its prompt (temperature 1), [B]."""
    out = []
    for p, c in zip(prompts, continuations):
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        c_ids = tokenizer.encode(c, add_special_tokens=False)
        ids = torch.tensor([p_ids + c_ids])[:, -model.config.n_positions :]
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.zeros_like(lp)
        mask[:, -len(c_ids) :] = 1
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
    d_nll = ref_nll_of(model, tok, [prompts[0]] * len(DEGENERATE), [" " + t for t in DEGENERATE.values()])
    for (name, text), v in zip(DEGENERATE.items(), d_nll):
        r = gold_parts(text, float(v))
        print(f"  {name:16s} proxy {proxy_reward([text])[0]:+.3f}  gold {r['gold']:+.3f}  "
              f"(s {r['sentiment']:+.3f}, distinct {r['distinct_1']:.2f}, density {r['density']:.2f}, "
              f"nll {float(v):.2f}; q {r['q_distinct']:.2f}*{r['q_density']:.2f}*{r['q_fluency']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
