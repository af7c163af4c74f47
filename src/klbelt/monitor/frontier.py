"""The over-optimisation frontier: gold reward against KL (nats per sequence), best-of-n next to RL runs.

Best-of-n's KL to the reference is per sequence (``klbelt bon``'s bon.json),
so RL runs are placed by their ``kl_seq`` (nats per sequence), never by the
per-token ``kl``. Gao et al. 2022's forms are fitted to the gold reward gained
since KL = 0, with d = sqrt(KL): best-of-n R = d (alpha - beta d), RL
R = d (alpha - beta log d) (:func:`klbelt.bon.fit_gold_vs_kl`).

RL runs enter per step, not per run: each logged step's (kl_seq, gold_reward),
as trailing 5-step means (:func:`rl_curve`), drawn as one line per run; the
RL fit pools those smoothed steps of every run given, each gain measured from
its own run's first step. Best-of-n enters per n (one point per bon.json row).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .readers import RunReadError, read_run


def read_bon(path) -> dict:
    """bon.json as written by ``klbelt bon``; a ``RunReadError`` naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RunReadError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    except ValueError as e:
        raise RunReadError(f"{path}: not JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    need = ("n", "kl_nats_per_seq", "reward", "gold_reward")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and all(k in r for k in need) for r in rows):
        raise RunReadError(f"{path}: not a klbelt bon.json (expected 'rows' with keys {', '.join(need)})")
    return data


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def rl_curve(run_dir, window: int = 5) -> dict:
    """One RL run's (kl_seq, gold_reward) per step, each a trailing ``window``-step mean.

    Raises ``RunReadError`` naming the run when its log has no ``kl_seq`` or no ``gold_reward``.
    """
    run = read_run(run_dir)
    pairs = [
        (r["kl_seq"], r["gold_reward"]) for r in run.records
        if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("kl_seq", "gold_reward"))
    ]
    for key in ("kl_seq", "gold_reward"):
        if not any(key in r for r in run.records):
            raise RunReadError(f"{run.path}: no {key} in this {run.format} log (the frontier needs KL in nats per sequence "
                               "and the gold reward per step)")
    if len(pairs) < 2:
        raise RunReadError(f"{run.path}: fewer than 2 steps with both kl_seq and gold_reward")
    kl, gold = _smooth([p[0] for p in pairs], window), _smooth([p[1] for p in pairs], window)
    beta = next((r["kl_coef"] for r in run.records if isinstance(r.get("kl_coef"), (int, float))), None)
    name = Path(run_dir).name
    return {"label": f"RL beta={beta:g}" if beta is not None else name, "name": name, "kl_seq": kl, "gold_reward": gold,
            "gold0": pairs[0][1]}


def frontier(bon: dict, runs: list[dict]) -> dict:
    """Fitted Gao et al. forms: ``{"bon": fit, "rl": fit or None, "crossings": [...]}``.

    Gains are measured from each curve's own KL = 0 point (best-of-n's n = 1 row; a run's
    first step). ``rl`` pools every run's points. ``crossings``: the KLs (nats/sequence)
    where the two fitted curves cross, inside the KL range both cover (no extrapolation);
    ``rl_ahead_at_max_kl``: whether RL's fit is above best-of-n's at the top of that range.
    """
    from ..bon import fit_gold_vs_kl, fitted_gain

    rows = sorted(bon["rows"], key=lambda r: r["n"])
    base = rows[0]["gold_reward"]
    out = {"bon": fit_gold_vs_kl([r["kl_nats_per_seq"] for r in rows], [r["gold_reward"] - base for r in rows], "bon"),
           "rl": None, "crossings": []}
    kls = [k for run in runs for k in run["kl_seq"]]
    gains = [g - run["gold0"] for run in runs for g in run["gold_reward"]]
    if runs:
        out["rl"] = fit_gold_vs_kl(kls, gains, "rl")
        top = min(max(k for k in kls if math.isfinite(k)), max(r["kl_nats_per_seq"] for r in rows))
        grid = [top * (i + 1) / 400 for i in range(400)]
        diff = (fitted_gain(out["rl"], grid) - fitted_gain(out["bon"], grid)).tolist()
        out["crossings"] = [grid[i + 1] for i in range(len(grid) - 1) if (diff[i] > 0) != (diff[i + 1] > 0)]
        out["rl_ahead_at_max_kl"] = diff[-1] > 0
    return out


def plot_frontier(ax, bon: dict, runs: list[dict], fits: dict) -> None:
    """Draw gold reward vs KL (nats/sequence) for best-of-n and each RL run on ``ax``, with the fitted forms."""
    from ..bon import fitted_gain

    rows = sorted(bon["rows"], key=lambda r: r["n"])
    base = rows[0]["gold_reward"]
    kl = [r["kl_nats_per_seq"] for r in rows]
    ax.plot(kl, [r["gold_reward"] for r in rows], "o-", color="black", label="best-of-n (gold)", zorder=3)
    for r in rows:
        ax.annotate(f"n={r['n']}", (r["kl_nats_per_seq"], r["gold_reward"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.plot(kl, [r["reward"] for r in rows], "o:", color="grey", ms=3, label="best-of-n (proxy)")
    grid = [max(kl) * (i + 1) / 200 for i in range(200)]  # each fit drawn over its own data's KL range
    f = fits["bon"]
    ax.plot(grid, (fitted_gain(f, grid) + base).tolist(), "--", color="black", lw=1,
            label=f"fit d(a - b d): a={f['alpha']:.3f}, b={f['beta']:.3f}")
    colors = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#bc4c00", "#1b7c83"]
    color_of: dict[str, str] = {}  # one colour per label: seeds of one beta share it, and one legend entry
    for run in runs:
        first = run["label"] not in color_of
        color = color_of.setdefault(run["label"], colors[len(color_of) % len(colors)])
        ax.plot(run["kl_seq"], run["gold_reward"], "-", color=color, lw=1.2 if first else 0.9,
                alpha=1.0 if first else 0.6, label=run["label"] if first else None)
    if fits.get("rl"):
        f = fits["rl"]
        gold0 = sum(run["gold0"] for run in runs) / len(runs)
        grid = [max(k for run in runs for k in run["kl_seq"]) * (i + 1) / 200 for i in range(200)]
        ax.plot(grid, (fitted_gain(f, grid) + gold0).tolist(), "--", color="#8250df", lw=1.2,
                label=f"RL fit d(a - b log d): a={f['alpha']:.3f}, b={f['beta']:.3f}")
    if max(kl + [k for run in runs for k in run["kl_seq"]]) > 20:  # a hacked run's KL dwarfs best-of-n's log n
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL to the reference, nats per sequence (kl_seq)")
    ax.set_ylabel("gold reward")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def summary_lines(fits: dict) -> list[str]:
    """The fitted coefficients and where RL and best-of-n cross, one line each."""
    b = fits["bon"]
    lines = [f"best-of-n: gold gain = d (alpha - beta d), d = sqrt(KL nats/seq): alpha {b['alpha']:.4f}, beta {b['beta']:.4f} "
             f"(rmse {b['rmse']:.4f}, {b['points']} points)"]
    if fits.get("rl"):
        r = fits["rl"]
        lines.append(f"RL: gold gain = d (alpha - beta log d): alpha {r['alpha']:.4f}, beta {r['beta']:.4f} "
                     f"(rmse {r['rmse']:.4f}, {r['points']} points)")
        cross = ", ".join(f"{c:.2f}" for c in fits["crossings"]) or "nowhere in the KL range both cover"
        lines.append(f"fitted curves cross at KL (nats/seq): {cross}; at the top of the shared KL range "
                     f"{'RL' if fits.get('rl_ahead_at_max_kl') else 'best-of-n'} is ahead")
    return lines


def write_frontier_png(out, bon_path, run_dirs) -> dict:
    """Read bon.json and the runs, fit, draw ``out`` (written atomically); return the fits."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .._files import atomic_write

    bon = read_bon(bon_path)
    runs = [rl_curve(d) for d in run_dirs]
    fits = frontier(bon, runs)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    plot_frontier(ax, bon, runs, fits)
    ax.set_title(f"Over-optimisation frontier ({bon.get('model', '?')}, {bon.get('task', '?')} task)")
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(out).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(out), "wb", lambda f: f.write(buf.getvalue()))
    return fits


def frontier_section_html(records, bon_path, run_name: str = "this run") -> str:
    """The report's frontier section: this run's gold reward vs kl_seq next to best-of-n (bon.json)."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    esc = html.escape
    try:
        bon = read_bon(bon_path)
    except RunReadError as e:
        return f"<h2>Over-optimisation frontier</h2><p class='missing'>{esc(str(e))}</p>"
    pairs = [(r["kl_seq"], r["gold_reward"]) for r in records
             if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("kl_seq", "gold_reward"))]
    if len(pairs) < 2:
        return ("<h2>Over-optimisation frontier</h2><p class='missing'>Not in this log: kl_seq and gold_reward "
                "(the frontier needs KL in nats per sequence and the gold reward per step)</p>")
    run = {"label": run_name, "kl_seq": _smooth([p[0] for p in pairs], 5), "gold_reward": _smooth([p[1] for p in pairs], 5),
           "gold0": pairs[0][1]}
    fits = frontier(bon, [run])
    fig, ax = plt.subplots(figsize=(8, 5))
    plot_frontier(ax, bon, [run], fits)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    items = "".join(f"<li>{esc(line)}</li>" for line in summary_lines(fits))
    return (f"<figure><h2>Over-optimisation frontier</h2><img alt='frontier' "
            f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
            f"<figcaption>Gold reward against KL in nats per sequence (kl_seq), this run next to best-of-n from "
            f"{esc(str(bon_path))}; trailing 5-step means.</figcaption><ul>{items}</ul></figure>")
