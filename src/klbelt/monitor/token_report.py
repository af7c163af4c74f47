"""The report's text view: responses with every token shaded by its KL to the reference.

Reads ``token_kl.jsonl`` (written by klbelt's trainer, one line per step:
``{"step", "responses": [{"prompt", "text", "tokens", "kl"}]}``, KL in nats per token)
and renders, for the first step, the last step and the step with the highest mean KL,
each logged response as one ``<span class="tok">`` per token whose background deepens
with the token's KL (red where the policy likes the token more than the reference does,
blue where less), the value in ``data-kl`` and ``title``; then the run's highest-KL tokens.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

TOKEN_KL_FILE = "token_kl.jsonl"
N_TOP_TOKENS = 20  # rows in the run's highest-KL token table
CONTEXT_TOKENS = 6  # tokens of context either side in that table


def find_token_file(path) -> Path | None:
    """``token_kl.jsonl`` of the run at ``path`` (its folder, or a file in it), or None when the run has none."""
    if path is None:
        return None
    path = Path(path)
    candidate = path / TOKEN_KL_FILE if path.is_dir() else path.parent / TOKEN_KL_FILE
    return candidate if candidate.is_file() else None


def read_token_log(path) -> list[dict]:
    """The well-formed lines of a ``token_kl.jsonl`` (a cut last line, from a killed run, is dropped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("responses"), list):
                records.append(r)
    return records


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def chosen_steps(token_records: list[dict], metric_records: list[dict]) -> list[tuple[str, dict]]:
    """``[(label, token_record)]`` for the first step, the last step and the highest-KL step (by the metric ``kl``).

    The highest-KL step is taken among the steps the token file holds; where the
    metrics have no ``kl`` the logged responses' own mean KL decides. A step that is
    several of these is shown once, with the labels joined.
    """
    if not token_records:
        return []
    by_step = {r["step"]: r for r in token_records}
    metric_kl = {r["step"]: r["kl"] for r in metric_records if _finite(r.get("kl")) and r.get("step") in by_step}

    def logged_mean(r):
        values = [v for resp in r["responses"] for v in resp.get("kl", []) if _finite(v)]
        return sum(values) / len(values) if values else -math.inf

    if metric_kl:
        top = max(metric_kl, key=lambda s: (metric_kl[s], -s))
        top_label = f"highest KL (step {top}, kl {metric_kl[top]:.4g} nats/token)"
    else:
        top = max(by_step, key=lambda s: (logged_mean(by_step[s]), -s))
        top_label = f"highest KL of the logged responses (step {top})"
    steps = sorted(by_step)
    labels: dict[int, list[str]] = {}
    for step, label in ((steps[0], f"first step ({steps[0]})"), (steps[-1], f"last step ({steps[-1]})"), (top, top_label)):
        labels.setdefault(step, []).append(label)
    return [("; ".join(labels[s]), by_step[s]) for s in sorted(labels)]


def _scale(token_records) -> float:
    """The |KL| that gets the full shade: the 99th percentile of the run's logged |KL| (one spike must not wash
    out the rest), the same for every step so that shades compare across steps."""
    values = sorted(abs(v) for r in token_records for resp in r["responses"] for v in resp.get("kl", []) if _finite(v))
    if not values:
        return 1.0
    return values[min(len(values) - 1, int(0.99 * len(values)))] or values[-1] or 1.0


def _shade(kl: float, scale: float) -> str:
    # square root: a token at 1/4 of the scale is already half shaded, so small drifts stay visible
    alpha = min(1.0, abs(kl) / scale) ** 0.5 * 0.85
    rgb = "207,34,46" if kl >= 0 else "9,105,218"
    return f"rgba({rgb},{alpha:.3f})"


def _legend(scale: float) -> str:
    cells = "".join(
        f"<span class='legend' style='background:{_shade(v, scale)}'>{v:+.3g}</span>"
        for v in (-scale, -scale / 4, 0.0, scale / 16, scale / 4, scale)
    )
    return f"<p class='meta'>Shade (nats): {cells}</p>"


def _spans(tokens, kls, scale) -> str:
    esc = html.escape
    out = []
    for tok, kl in zip(tokens, kls):
        value = kl if _finite(kl) else 0.0
        out.append(
            f"<span class='tok' data-kl='{esc(repr(kl))}' title='KL {value:.4g} nats' "
            f"style='background:{_shade(value, scale)}'>{esc(tok)}</span>"
        )
    return "".join(out)


def top_tokens(token_records: list[dict], n: int = N_TOP_TOKENS) -> list[dict]:
    """The ``n`` logged tokens with the highest KL: ``{token, kl, step, before, after}`` (context as text)."""
    found = []
    for r in token_records:
        for resp in r["responses"]:
            tokens, kls = resp.get("tokens", []), resp.get("kl", [])
            for i, (tok, kl) in enumerate(zip(tokens, kls)):
                if _finite(kl):
                    found.append((kl, r["step"], i, tokens))
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [
        {
            "token": tokens[i],
            "kl": kl,
            "step": step,
            "before": "".join(tokens[max(0, i - CONTEXT_TOKENS) : i]),
            "after": "".join(tokens[i + 1 : i + 1 + CONTEXT_TOKENS]),
        }
        for kl, step, i, tokens in found[:n]
    ]


def token_section_html(token_records: list[dict], metric_records: list[dict] = ()) -> str:
    """The HTML section (a string to put in the report's body); ``""`` when there is nothing to show."""
    chosen = chosen_steps(token_records, list(metric_records))
    if not chosen:
        return ""
    esc = html.escape
    scale = _scale(token_records)
    parts = [
        "<section id='token-kl'><h2>Where the policy drifted, token by token</h2>",
        "<p class='meta'>Each response token is shaded by its KL estimate to the reference, "
        "k1 = log pi(token) - log ref(token) in nats: red where the policy makes the token more likely than the "
        f"reference does, blue where less; full shade at |KL| >= {scale:.4g} nats (the 99th percentile of the "
        "logged tokens). Hover a token for its value. The prompt is in grey.</p>",
        _legend(scale),
    ]
    for label, record in chosen:
        parts.append(f"<h3>{esc(label)}</h3>")
        for resp in record["responses"]:
            kls = [v for v in resp.get("kl", []) if _finite(v)]
            mean = f"{sum(kls) / len(kls):.4g}" if kls else "n/a"
            parts.append(
                f"<div class='resp' data-step='{record['step']}'><span class='prompt'>{esc(str(resp.get('prompt', '')))}</span>"
                f"{_spans(resp.get('tokens', []), resp.get('kl', []), scale)}"
                f"<span class='respmeta'> [mean KL {mean} nats/token]</span></div>"
            )
    rows = "\n".join(
        f"<tr><td class='tokcell'>{esc(t['token'])}</td><td>{t['kl']:.4g}</td><td>{t['step']}</td>"
        f"<td class='ctx'>{esc(t['before'])}<mark>{esc(t['token'])}</mark>{esc(t['after'])}</td></tr>"
        for t in top_tokens(token_records)
    )
    parts.append(
        "<h3>The run's highest-KL tokens</h3>"
        "<table class='toptok'><tr><th>token</th><th>KL (nats)</th><th>step</th><th>context</th></tr>\n"
        f"{rows}\n</table></section>"
    )
    return "\n".join(parts)


TOKEN_CSS = (
    ".resp{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;margin:0.4em 0;padding:4px 6px;"
    "border-left:3px solid #d0d7de}.prompt{color:#6e7781}.respmeta{color:#57606a;font-size:12px}"
    ".tok{border-radius:2px}.legend{padding:0 6px;margin-right:2px;font-size:12px}.tokcell,.ctx{white-space:pre-wrap;font-family:ui-monospace,monospace}"
)
