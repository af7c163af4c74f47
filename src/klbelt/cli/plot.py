"""``klbelt plot KIND --out FILE.png``: figures computed by klbelt (matplotlib, Agg backend).

Kinds:
  beta-effect   the article's two beta plots, made real in the exact testbed:
                total reward vs KL for several beta, and the equilibrium KL vs
                beta (closed form next to the KL reached by optimisation).
"""

from __future__ import annotations

import argparse
import os
import sys

from .args import comma_floats


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a figure (beta-effect, frontier)", description=__doc__.replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    b = kinds.add_parser("beta-effect", help="total reward vs KL, and equilibrium KL vs beta, in the testbed")
    b.add_argument("--out", required=True, help="output file (PNG; the format follows the extension)")
    b.add_argument("--ref", type=comma_floats, default=None, help="reference probabilities (default: 8-response problem)")
    b.add_argument("--reward", type=comma_floats, default=None, help="reward of each response")
    b.add_argument("--betas", type=comma_floats, default=None, help="betas of the left panel (default 0.05,0.1,0.2,0.5)")
    b.set_defaults(func=_beta_effect)
    f = kinds.add_parser("frontier", help="gold reward vs KL (nats/sequence): best-of-n next to RL runs, Gao et al. fits")
    f.add_argument("runs", nargs="*", metavar="RUN", help="RL run folders (metrics.jsonl with kl_seq and gold_reward)")
    f.add_argument("--bon", required=True, help="bon.json written by klbelt bon")
    f.add_argument("--out", required=True, help="output file (PNG; the format follows the extension)")
    f.set_defaults(func=_frontier)


def _frontier(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("klbelt plot: error: matplotlib is not installed (pip install 'klbelt[plot]')", file=sys.stderr)
        return 2
    from ..monitor.frontier import summary_lines, write_frontier_png
    from ..monitor.readers import RunReadError

    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        print(f"klbelt plot: error: {args.out}: directory {directory} does not exist", file=sys.stderr)
        return 2
    try:
        fits = write_frontier_png(args.out, args.bon, args.runs)
    except (RunReadError, ValueError, OSError) as err:
        print(f"klbelt plot: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    for line in summary_lines(fits):
        print(line)
    return 0


def _beta_effect(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("klbelt plot: error: matplotlib is not installed (pip install 'klbelt[plot]')", file=sys.stderr)
        return 2
    from ..sim import compare, plots

    ref = list(compare.DEFAULT_REF) if args.ref is None else args.ref
    reward = list(compare.DEFAULT_REWARD) if args.reward is None else args.reward
    betas = plots.ARTICLE_BETAS if args.betas is None else args.betas
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        print(f"klbelt plot: error: {args.out}: directory {directory} does not exist", file=sys.stderr)
        return 2
    try:
        if any(not b > 0 for b in betas):
            raise ValueError(f"--betas must all be > 0, got {betas}")
        data = plots.plot_beta_effect(args.out, ref, reward, betas)
    except (ValueError, TypeError, OSError) as err:
        print(f"klbelt plot: error: {args.out}: {err}" if isinstance(err, OSError) else f"klbelt plot: error: {err}",
              file=sys.stderr)
        return 2
    eq = data["equilibrium"]
    worst = max(abs(m / c - 1) for m, c in zip(eq["measured_kl"], eq["measured_closed_form_kl"]))
    print(f"wrote {args.out}: measured equilibrium KL within {worst * 100:.2g}% of the closed form "
          f"at {len(eq['measured_kl'])} betas in [{min(eq['measured_beta']):g}, {max(eq['measured_beta']):g}]")
    return 0
