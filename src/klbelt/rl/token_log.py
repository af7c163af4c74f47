"""Per-token KL of a few responses per step (``token_kl.jsonl``): where the policy drifted, token by token.

One line per step: ``{"step", "responses": [{"prompt", "text", "tokens", "kl"}]}`` where
``tokens`` are the response's valid tokens as strings (their concatenation is ``text``)
and ``kl[i]`` is token i's KL estimate to the reference, nats: k1 = log pi - log ref (times
the importance weight pi/mu when the rollouts were drawn by another sampler mu, so that the
values average to the step's ``kl`` metric exactly as the metric does).
"""

from __future__ import annotations

import torch

N_LOGGED = 4  # responses logged per step (the first rows of rank 0's batch, as samples.jsonl shows)


def token_strings(tokenizer, ids) -> list[str]:
    """The strings of ``ids``, one per token, whose concatenation is ``tokenizer.decode(ids)``.

    Decoding tokens one at a time breaks byte-level BPE (a character split over two
    tokens decodes to U+FFFD twice) and SentencePiece (a leading space is dropped), so
    token i gets the text that decoding ``ids[:i+1]`` adds to decoding ``ids[:i]``. A token
    whose bytes end mid-character gets ``""`` and its bytes show with the next token.
    """
    ids = [int(i) for i in ids]
    pieces, shown = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and i + 1 < len(ids):  # an unfinished character: wait for its next bytes
            pieces.append("")
            continue
        if not text.startswith(shown):  # the decoder rewrote earlier text (rare): keep the total exact
            common = 0
            while common < min(len(text), len(shown)) and text[common] == shown[common]:
                common += 1
            # cut the pieces back to the common prefix (emptied tokens stay as ""), then go on from there
            total = 0
            for j, piece in enumerate(pieces):
                pieces[j] = piece[: max(0, common - total)]
                total += len(piece)
            shown = "".join(pieces)
        pieces.append(text[len(shown) :])
        shown = text
    return pieces


def token_kl_record(step: int, prompts, responses: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor, tokenizer, n: int = N_LOGGED) -> dict:
    """The ``token_kl.jsonl`` line of one step: the first ``n`` responses' tokens and per-token KL.

    Args:
        prompts: the prompts of the rows, ``len >= n`` (or of the batch's first rows).
        responses: ``[B, R]`` token ids; ``mask``: ``[B, R]``, 1 on valid tokens.
        kl: ``[B, R]`` per-token KL estimate, nats (the values the step's ``kl`` metric averages).
    """
    rows = []
    for b in range(min(n, responses.shape[0])):
        valid = mask[b].bool()
        ids = responses[b][valid].tolist()
        tokens = token_strings(tokenizer, ids)
        rows.append({
            "prompt": prompts[b],
            "text": "".join(tokens),
            "tokens": tokens,
            "kl": [round(float(v), 6) for v in kl[b][valid].tolist()],
        })
    return {"step": step, "responses": rows}
