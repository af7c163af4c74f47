"""``klbelt sim``: optimise a categorical policy in the exact testbed, or compare KL controllers.

Examples::

    klbelt sim --ref 0.2,0.3,0.5 --reward 1,0,0 --kl-coef 0.5 --json
    klbelt sim --controller adaptive --rule proportional --target-kl 0.5 --gradient sampled
    klbelt sim --compare-controllers
"""

from __future__ import annotations

import argparse
import json
import sys

from .args import comma_floats, seed_list


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sim",
        help="exact KL-regularised testbed: optimum in closed form, controllers compared",
        description="Optimise a categorical policy in the exact testbed, or compare KL controllers.",
        epilog="examples:\n  klbelt sim --ref 0.2,0.3,0.5 --reward 1,0,0 --kl-coef 0.5 --json\n"
        "  klbelt sim --controller adaptive --rule proportional --target-kl 0.5 --gradient sampled\n"
        "  klbelt sim --compare-controllers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ref", type=comma_floats, default=None,
                   help="reference probabilities, comma-separated, > 0, summing to 1 (default: 8-response problem)")
    p.add_argument("--reward", type=comma_floats, default=None, help="reward of each response, comma-separated")
    p.add_argument("--kl-coef", type=float, default=0.1, help="beta (fixed), or the initial beta of a controller")
    p.add_argument("--controller", choices=("fixed", "adaptive", "pid"), default="fixed")
    p.add_argument("--rule", choices=("step", "proportional"), default="step", help="adaptive controller's rule")
    p.add_argument("--target-kl", type=float, default=None, help="controller target, nats per response")
    p.add_argument("--horizon", type=float, default=10000, help="proportional rule's horizon (samples)")
    p.add_argument("--gradient", choices=("exact", "sampled"), default="exact")
    p.add_argument("--estimator", choices=("k1", "k2", "k3", "abs", "kl", "mse", "low_var_kl"), default="k1",
                   help="KL estimator: k1, k2, k3, abs (kl, mse, low_var_kl: verl's names for k1, k2, k3)")
    p.add_argument("--kl-in", choices=("reward", "loss"), default="reward", help="sampled gradients: where the KL goes")
    p.add_argument("--steps", type=int, default=None, help="controller updates (default 200; 300 with --compare-controllers)")
    p.add_argument("--inner-steps", type=int, default=None, help="policy steps per controller update (default 10; 5 when comparing)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per policy step (sampled gradients)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 0.1 exact, 0.02 sampled)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-controllers", action="store_true",
                   help="run step, proportional and PID controllers on the same target with sampled gradients")
    p.add_argument("--every", type=int, default=25, help="print the beta trajectory every N updates (comparison)")
    p.add_argument("--json", action="store_true", help="print JSON")
    g = p.add_argument_group("the English demo's plant (--plant demo)")
    g.add_argument("--plant", choices=("demo",), default=None,
                   help="run the controller on a noisy plant with the English demo's measured dynamics and noise "
                        "(36 updates, one Adam step each, KL 0 at the first observation) over --seeds, and print "
                        "the step response and the demo's criteria (klbelt.sim.plant)")
    g.add_argument("--seeds", type=seed_list, default=list(range(20)), help="plant seeds: 'A-B' or a comma list (default 0-19)")
    g.add_argument("--pid-gains", type=comma_floats, default=None, help="kp,ki,kd of --controller pid (default 0.05,0.02,1.0)")
    g.add_argument("--pid-warmup", type=int, default=0, help="pid: updates with beta >= --kl-coef at the start")
    g.add_argument("--pid-smoothing", type=float, default=0.8, help="pid: EMA weight on the past KL (P and D terms)")
    g.add_argument("--pid-min-kl-coef", type=float, default=0.0, help="pid: floor on beta")
    g.add_argument("--observe", choices=("k1", "k3"), default="k1", help="plant: the estimator the controller is fed")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..control import AdaptiveKLController
    from ..sim import compare, testbed

    ref = list(compare.DEFAULT_REF) if args.ref is None else args.ref
    reward = list(compare.DEFAULT_REWARD) if args.reward is None else args.reward
    try:
        if args.plant:
            return _plant(args)
        if args.compare_controllers:
            return _compare(args, ref, reward)
        if args.controller == "fixed":
            controller = args.kl_coef
        else:
            if args.target_kl is None:
                raise ValueError(f"--target-kl is required with --controller {args.controller}")
            if args.controller == "adaptive":
                controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.horizon, rule=args.rule)
            else:
                controller = _pid(args, args.target_kl)
        lr = args.lr if args.lr is not None else (0.1 if args.gradient == "exact" else 0.02)
        res = testbed.simulate(
            ref, reward, controller, steps=_default(args.steps, 200), inner_steps=_default(args.inner_steps, 10),
            gradient=args.gradient, batch_size=args.batch_size, estimator=args.estimator, kl_in=args.kl_in,
            optimizer=args.optimizer, lr=lr, seed=args.seed,
        )
        beta = res.kl_coef[-1]
        best = testbed.optimum(ref, reward, beta) if beta > 0 else None
    except (ValueError, TypeError) as err:
        print(f"klbelt sim: error: {err}", file=sys.stderr)
        return 2
    out = {
        "unit": "nats per response (= per token: one-token responses)",
        "kl_coef": beta,
        "kl": res.kl[-1],
        "closed_form_kl": best.kl if best else None,
        "policy": res.probs,
        "closed_form_policy": best.probs if best else None,
        "expected_reward": res.reward[-1],
        "closed_form_expected_reward": best.expected_reward if best else None,
    }
    if args.controller != "fixed":
        out["controller"] = controller.state_dict()
        out["target_kl"] = args.target_kl
        out["kl_coef_for_target"] = testbed.kl_coef_for_target(ref, reward, args.target_kl)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"beta (kl_coef)        {beta:.6g}")
    print(f"KL(pi || ref)         {out['kl']:.6g} nats   closed form at this beta: "
          f"{'n/a (beta = 0)' if best is None else format(best.kl, '.6g')}")
    print(f"E[r]                  {out['expected_reward']:.6g}        closed form: "
          f"{'n/a' if best is None else format(best.expected_reward, '.6g')}")
    print("policy                " + ", ".join(f"{p:.4f}" for p in res.probs))
    if best:
        print("closed-form policy    " + ", ".join(f"{p:.4f}" for p in best.probs))
    if args.controller != "fixed":
        print(f"target KL {args.target_kl:g}: the optimum reaches it at beta = {out['kl_coef_for_target']:.6g}")
    return 0


def _pid(args, target_kl: float):
    from ..control import PIDKLController

    gains = {}
    if args.pid_gains is not None:
        if len(args.pid_gains) != 3:
            raise ValueError(f"--pid-gains must be three numbers kp,ki,kd, got {args.pid_gains}")
        gains = dict(zip(("kp", "ki", "kd"), args.pid_gains))
    return PIDKLController(args.kl_coef, target_kl, smoothing=args.pid_smoothing, min_kl_coef=args.pid_min_kl_coef,
                           warmup=args.pid_warmup, **gains)


def _plant(args) -> int:
    """The demo plant: one run per seed, the step response of the first, and the demo's criteria over all."""
    from dataclasses import replace

    from ..control import AdaptiveKLController, FixedKLController
    from ..sim.plant import DEMO_PLANT, run_seeds

    target = 0.05 if args.target_kl is None else args.target_kl
    if args.controller == "pid":
        make = lambda: _pid(args, target)  # noqa: E731
    elif args.controller == "adaptive":
        make = lambda: AdaptiveKLController(args.kl_coef, target, args.horizon, rule=args.rule)  # noqa: E731
    else:
        make = lambda: FixedKLController(args.kl_coef)  # noqa: E731
    make()  # bad settings fail here, before any run
    plant = replace(DEMO_PLANT, observe_estimator=args.observe, **({"steps": args.steps} if args.steps else {}))
    rows = run_seeds(make, args.seeds, plant)
    crit = ("second_half_kl", "min_early_beta", "late_peak")
    passed = {k: sum(r["passed"][k] for r in rows) for k in crit}
    if args.json:
        print(json.dumps({"plant": vars(plant), "target_kl": target, "controller": make().state_dict()["config"],
                          "passed": passed, "runs": rows}))
        return 0
    first = rows[0]
    print(f"Demo plant ({plant.n_responses} responses, Adam lr {plant.lr:g}, {plant.batch_size} samples per update, "
          f"controller fed the mean {plant.observe_estimator} of {plant.observe_samples} tokens), target "
          f"{target:g} nats/token, {make()!r}")
    print(f"step response, seed {first['seed']} (beta during the update; observed and true KL):")
    print(f"{'update':>6} {'beta':>8} {'observed':>9} {'true KL':>8}")
    true_before = [0.0] + first["kl"][:-1]  # the policy each update observed: as it was before the update's step
    for k, (b, o, t) in enumerate(zip(first["kl_coef"], first["observed_kl"], true_before)):
        print(f"{k:>6} {b:>8.4f} {o:>9.4f} {t:>8.4f}")
    print()
    print(f"{'seed':>4} {'2nd-half KL':>11} {'min beta 0-4':>12} {'late peak':>9} {'tail in band':>12}")
    for r in rows:
        print(f"{r['seed']:>4} {r['second_half_kl']:>11.4f} {r['min_early_beta']:>12.4f} {r['late_peak']:>8.2f}x "
              f"{r['tail_in_band']:>12.2f}")
    n = len(rows)
    print(f"runs passing: second-half KL within +-20% {passed['second_half_kl']}/{n}; beta > 0 over updates 0-4 "
          f"{passed['min_early_beta']}/{n}; 3-update KL mean <= 1.5x target after update 8 {passed['late_peak']}/{n}")
    return 0


def _compare(args, ref, reward) -> int:
    from ..sim import compare

    target = 0.5 if args.target_kl is None else args.target_kl
    out = compare.compare_controllers(
        ref, reward, target, init_kl_coef=args.kl_coef, horizon=args.horizon, steps=_default(args.steps, 300),
        inner_steps=_default(args.inner_steps, 5), batch_size=args.batch_size, lr=_default(args.lr, 0.02), seed=args.seed,
    )
    if args.json:
        print(json.dumps(out))
        return 0
    s = out["settings"]
    print(f"Controller comparison: target KL {target:g} {out['unit']}")
    print(f"  testbed: {len(ref)} responses, beta at the target (closed form) = {out['kl_coef_for_target']:.4f}; "
          f"start beta = {s['init_kl_coef']:g}, policy at the reference (KL = 0)")
    print(f"  each update: {s['inner_steps']} Adam steps (lr {s['lr']:g}) on sampled policy gradients, "
          f"{s['batch_size']} samples each, k1 in the reward; controller fed the phase's mean k1 "
          f"(n_steps = {s['inner_steps'] * s['batch_size']}); {s['steps']} updates, seed {s['seed']}")
    print("  settling = first update after which the exact KL stays within 10% of target;")
    print("  overshoot = max (KL - target)/target after KL first reaches the target;")
    print("  steady-state error = mean |KL - target|/target over the last 25% of updates.")
    print("  'observed' = the noisy KL the controller was fed: in-band fraction of the last 25%, ss-error,")
    print("  and the sd of (observed - exact) relative to target.")
    print()
    header = (f"{'controller':<13}{'settling':>9}{'overshoot':>10}{'ss-error':>9}  "
              f"{'observed: in band':>17}{'ss-error':>9}{'noise sd':>9}{'final beta':>11}")
    print(header)
    for name, r in out["runs"].items():
        e, o = r["exact"], r["observed"]
        print(f"{name:<13}{_fmt(e['settling_step']):>9}{_pct(e['overshoot']):>10}{_pct(e['steady_state_error']):>9}  "
              f"{_pct(o['tail_in_band']):>17}{_pct(o['steady_state_error']):>9}"
              f"{r['observation_noise_std'] / target * 100:>8.1f}%{r['final_kl_coef']:>11.4f}")
    print()
    every = max(1, args.every)
    idx = list(range(0, s["steps"], every)) + ([s["steps"] - 1] if (s["steps"] - 1) % every else [])
    print("beta trajectory (after update k):")
    print(f"{'k':>5}" + "".join(f"{name:>14}" for name in out["runs"]) + "   exact KL: " + " / ".join(out["runs"]))
    for k in idx:
        betas = "".join(f"{r['kl_coef'][k]:>14.4f}" for r in out["runs"].values())
        kls = " / ".join(f"{r['kl'][k]:.3f}" for r in out["runs"].values())
        print(f"{k + 1:>5}{betas}   {kls}")
    return 0


def _default(value, default):
    return default if value is None else value


def _fmt(step) -> str:
    return "never" if step is None else str(step)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"
