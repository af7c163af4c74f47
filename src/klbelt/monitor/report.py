"""Plots of a run's history and a self-contained HTML report (PNG images embedded as data URIs).

Needs matplotlib (``pip install 'klbelt[plot]'``); it is imported inside the functions.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from .._files import atomic_write
from .metrics import KL_HIST_EDGES
from .rules import diagnose, exit_code
from .token_report import TOKEN_CSS, find_token_file, read_token_log, token_section_html

BAND = (0.01, 0.1)  # the article's healthy mean KL, nats/token
_STATUS_COLOR = {"ok": "#1a7f37", "warning": "#9a6700", "unhealthy": "#cf222e", "n/a": "#6e7781"}


def _series(records, name):
    xs, ys = [], []
    for r in records:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _mark_alerts(ax, alerts):
    for a in alerts:
        ax.axvline(a.step, color=_STATUS_COLOR[a.severity], lw=0.8, ls=":", alpha=0.8)


def _mark_ref_syncs(ax, records) -> bool:
    """Dashed grey lines at the steps after which the reference became the policy (``ref_sync`` events)."""
    steps = [r["step"] for r in records if r.get("ref_sync") and "step" in r]
    for step in steps:
        ax.axvline(step, color="#6e7781", lw=1.0, ls="--", alpha=0.9)
    return bool(steps)


def figures(records, alerts=()) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """The report's plots as ``(title, caption, png_bytes)``, and the plots left out for lack of data."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out, missing = [], []

    # KL over time: mean (with the healthy band) and max
    mean_name = "kl" if _series(records, "kl")[0] else "kl_seq" if _series(records, "kl_seq")[0] else None
    if mean_name:
        per_token = mean_name == "kl"
        unit = "nats/token" if per_token else "nats/sequence"
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        x, y = _series(records, mean_name)
        ax1.plot(x, y, color="#0969da", label=f"mean KL ({mean_name})")
        xe, ye = _series(records, "kl_exact")
        if xe:
            ax1.plot(xe, ye, color="#8250df", ls="--", label="exact KL (kl_exact)")
        if per_token:
            ax1.axhspan(*BAND, color="#2da44e", alpha=0.15, label=f"healthy band {BAND[0]}-{BAND[1]}")
        ax1.set_ylabel(f"mean KL ({unit})")
        ax1.legend(loc="upper left", fontsize=8)
        _mark_alerts(ax1, alerts)
        max_names = [n for n in ("kl_max", "kl_p99", "kl_p90") if _series(records, n)[0]]
        max_unit = "nats/token"
        if not max_names and _series(records, "kl_seq_max")[0]:
            max_names, max_unit = ["kl_seq_max"], "nats/sequence"
        for n in max_names:
            ax2.plot(*_series(records, n), label=n)
        if max_names:
            ax2.legend(loc="upper left", fontsize=8)
            ax2.set_ylabel(f"max KL ({max_unit})")
        else:
            ax2.text(0.5, 0.5, "max KL not in this log", ha="center", va="center", transform=ax2.transAxes)
        _mark_alerts(ax2, alerts)
        synced = _mark_ref_syncs(ax1, records) | _mark_ref_syncs(ax2, records)
        ax2.set_xlabel("step")
        caption = (
            "Mean KL per step with the article's healthy band shaded; below, the largest per-token KL "
            "(spikes) and high percentiles. Dotted lines: steps where an alert fired."
        )
        if synced:
            caption += " Dashed grey lines: after these steps the reference became the current policy (ref_sync_every)."
        if not per_token:
            caption += " Only per-sequence KL was logged, so there is no per-token band."
        out.append(("KL over time", caption, _png(fig)))
    else:
        missing.append("KL over time (no kl or kl_seq)")

    x, y = _series(records, "kl_coef")
    if x:
        fig, ax = plt.subplots(figsize=(8, 2.8))
        ax.plot(x, y, color="#bf3989")
        ax.set_xlabel("step")
        ax.set_ylabel("kl_coef (beta)")
        _mark_ref_syncs(ax, records)
        out.append(("beta over time", "The KL penalty coefficient beta (kl_coef) at each step.", _png(fig)))
    else:
        missing.append("beta over time (no kl_coef)")

    xr, yr = _series(records, "reward")
    xg, yg = _series(records, "gold_reward")
    if xr or xg:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        if xr:
            ax.plot(xr, yr, color="#0969da", label="proxy reward (reward)")
        if xg:
            ax.plot(xg, yg, color="#cf222e", label="gold reward (gold_reward)")
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward per sequence")
        ax.legend(loc="best", fontsize=8)
        _mark_alerts(ax, alerts)
        out.append(
            ("Proxy and gold reward", "Proxy reward rising while gold reward falls is reward hacking.", _png(fig))
        )
    else:
        missing.append("reward over time (no reward or gold_reward)")

    kl_name = "kl" if _series(records, "kl")[0] else "kl_seq"
    pairs = [
        (r["step"], r[kl_name], r["gold_reward"])
        for r in records
        if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in (kl_name, "gold_reward"))
    ]
    if pairs:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps, kls, golds = zip(*pairs)
        sc = ax.scatter(kls, golds, c=steps, cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, label="step")
        ax.set_xlabel(f"{kl_name} ({'nats/token' if kl_name == 'kl' else 'nats/sequence'})")
        ax.set_ylabel("gold reward")
        out.append(
            (
                "Gold reward vs KL",
                "The over-optimisation frontier: gold reward first rises with KL, then falls once the policy "
                "exploits the proxy.",
                _png(fig),
            )
        )
    else:
        missing.append("gold reward vs KL (no gold_reward)")

    hists = [(r["step"], r["kl_hist"]) for r in records if isinstance(r.get("kl_hist"), list)]
    if hists:
        last = hists[-10:]
        counts = [sum(col) for col in zip(*(h for _, h in last))]
        labels = [f"<{KL_HIST_EDGES[0]:g}"] + [
            f"[{a:g},{b:g})" for a, b in zip(KL_HIST_EDGES[:-1], KL_HIST_EDGES[1:])
        ] + [f">={KL_HIST_EDGES[-1]:g}"]
        fig, ax = plt.subplots(figsize=(9, 3.4))
        ax.bar(range(len(counts)), counts, color="#0969da")
        ax.set_xticks(range(len(counts)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_yscale("log" if max(counts) > 0 else "linear")
        ax.set_xlabel("per-token KL estimate (nats/token)")
        ax.set_ylabel("tokens")
        out.append(
            (
                "Per-token KL distribution",
                f"Per-token KL of the valid tokens of steps {last[0][0]}-{last[-1][0]} (the last {len(last)} logged).",
                _png(fig),
            )
        )
    else:
        qs = [(n, _series(records, n)[1][-10:]) for n in ("kl_p50", "kl_p90", "kl_p99", "kl_max")]
        qs = [(n, v) for n, v in qs if v]
        if qs:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.boxplot([v for _, v in qs])
            ax.set_xticks(range(1, len(qs) + 1), [n for n, _ in qs])
            ax.set_ylabel("nats/token")
            out.append(("Per-token KL distribution", "Quantiles of per-token KL over the last steps.", _png(fig)))
        else:
            missing.append("per-token KL distribution (no kl_hist or kl quantiles)")
    return out, missing


def render_html(records, *, title, verdicts, alerts, source="", token_html="") -> str:
    """The report page as a string (``token_html``: the per-token KL section, see :mod:`.token_report`)."""
    figs, missing = figures(records, alerts)
    code = exit_code(verdicts)
    overall = {0: "healthy", 1: "warnings", 2: "unhealthy"}.get(code, "nothing could be checked")
    color = _STATUS_COLOR[{0: "ok", 1: "warning", 2: "unhealthy"}.get(code, "n/a")]
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(v.rule)}</td><td style='color:{_STATUS_COLOR[v.status]};font-weight:bold'>{esc(v.status)}</td>"
        f"<td>{esc(', '.join(map(str, v.fired_at)) or '-')}</td><td>{esc(v.thresholds)}</td><td>{esc(v.message)}</td></tr>"
        for v in verdicts
    )
    fig_html = "\n".join(
        f"<figure><h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{esc(c)}</figcaption></figure>"
        for t, c, png in figs
    )
    missing_html = (
        "<p class='missing'>Not in this log: " + esc("; ".join(missing)) + "</p>" if missing else ""
    )
    steps = f"{len(records)} steps ({records[0]['step']}-{records[-1]['step']})" if records else "no steps"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#1f2328}}
table{{border-collapse:collapse;width:100%;font-size:14px}}td,th{{border:1px solid #d0d7de;padding:4px 6px;vertical-align:top}}
th{{background:#f6f8fa;text-align:left}}figure{{margin:1.5em 0}}img{{max-width:100%}}
figcaption,.missing,.meta{{color:#57606a;font-size:14px}}
{TOKEN_CSS}
</style></head><body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(source)} &middot; {esc(steps)}</p>
<p>Verdict: <strong style="color:{color}">{overall}</strong> (klbelt doctor exit code {code})</p>
<h2>Health verdicts</h2>
<table><tr><th>rule</th><th>status</th><th>alert at steps</th><th>thresholds</th><th>message</th></tr>
{rows}
</table>
{fig_html}
{token_html}
{missing_html}
</body></html>
"""


def write_report(history, out, *, title="klbelt run", verdicts=None, alerts=None, rules=None, source="", token_file=None,
                 bon_file=None) -> Path:
    """Write the HTML report of ``history`` (records, or a :class:`~klbelt.monitor.readers.Run`) to ``out``.

    Verdicts and alerts are recomputed with ``rules`` unless given. The responses shaded
    by per-token KL come from ``token_file`` (default: ``token_kl.jsonl`` beside a Run's
    file); without one that section is left out. ``bon_file``: a ``klbelt bon`` bon.json;
    with it the page gains the over-optimisation frontier (gold reward vs kl_seq). The file is
    written to a temporary name and renamed, so no half-written report is left.
    """
    records = getattr(history, "records", history)
    if hasattr(history, "path") and not source:
        source = f"{history.path} ({history.format})"
    records = list(records)
    if verdicts is None or alerts is None:
        verdicts, alerts = diagnose(records, rules)
    token_file = token_file or find_token_file(getattr(history, "path", None))
    token_html = token_section_html(read_token_log(token_file), records) if token_file else ""
    if bon_file:  # the over-optimisation frontier: this run next to best-of-n (klbelt bon's bon.json)
        from .frontier import frontier_section_html

        token_html += frontier_section_html(records, bon_file)
    page = render_html(records, title=title, verdicts=verdicts, alerts=alerts, source=source, token_html=token_html)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "w", lambda f: f.write(page))
    return out
