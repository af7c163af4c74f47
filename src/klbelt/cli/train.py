"""``klbelt train --config FILE``: the trainer on any local Hugging Face causal LM."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

from ..demo.models import SMOLLM2_GGUF  # noqa: F401  (re-exported)


def add_parser(sub) -> None:
    import argparse
    import dataclasses

    from ..rl.config import TrainConfig
    from ..rl.fields import ALIASES

    p = sub.add_parser(
        "train",
        usage="klbelt train [--config FILE | --resume DIR] [--FIELD VALUE ...] [--print-config] [--nproc N]",
        help="PPO/GRPO-style training with a KL belt on any local Hugging Face causal LM",
        description="Train with a YAML or JSON config file, any field of which can be overridden on the command "
        "line: klbelt train --config run.yaml --kl_coef 0.05 --lr 1e-6. Values are read as in the file (1e-6 is "
        "a number; null, true and [0.5, 2.0] work). TRL/verl names such as beta, num_generations or kl_penalty "
        "are accepted and reported under klbelt's name. Data parallel: add --nproc N, or run under "
        "torchrun --nproc-per-node N -m klbelt train ...; batch_size is the global batch.",
        epilog="Example configs: examples/configs/ in the klbelt repository.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of the fields below")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint (reads DIR/config.json)")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged config (file, then command-line values) as YAML and exit")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (starts torchrun --standalone; 1 thread each unless "
                   "OMP_NUM_THREADS is set)")
    fields = p.add_argument_group("config fields (each overrides the file; defaults in brackets)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        fields.add_argument(f"--{f.name}", dest=f"cfg:{f.name}", metavar="VALUE", default=argparse.SUPPRESS,
                            help=f"{TrainConfig.field_help(f.name)} [{shown}]".replace("%", "%%"))
    for alias, name in ALIASES.items():  # accepted, echoed under klbelt's name, not listed
        fields.add_argument(f"--{alias}", dest=f"cfg:{alias}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def overrides(args) -> dict:
    """``{key: raw string}`` of the config fields given on the command line, in the user's spelling."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def load_policy(name: str):
    """(model, tokenizer) for "tiny"/"demo", "smollm2" or a local Hugging Face causal-LM directory."""
    from ..demo.models import load_model

    return load_model(name)


def load_prompts(source: str, tokenizer) -> list[str]:
    """Prompts: "demo" (corpus prompts), a .txt file (one per line) or a .jsonl file ({"prompt": ...})."""
    if source == "demo":
        from ..demo.corpus import demo_prompts

        return demo_prompts(tokenizer, n=1024, prompt_tokens=6, split="train")
    if source == "english":
        from ..demo.english import english_prompts

        return english_prompts("train")
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"prompts file {path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"prompts file {path}: line {i} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'prompts file {path}: line {i} has no string "prompt" field')
            prompts.append(record["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path}: holds no prompts")
    return prompts


def load_reward(name: str, policy_tokenizer=None, device: str = "cpu"):
    """A texts -> scores reward: "vader", a local sequence-classification model dir, or "module:function".

    A model dir is a :class:`~klbelt.rl.reward_model.RewardModel` on ``device``: it scores the
    rollout's token ids directly when it shares ``policy_tokenizer``'s vocabulary, else the decoded texts."""
    if name == "vader":
        from ..demo.rewards import proxy_reward

        return proxy_reward
    if ":" in name and not Path(name).exists():
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward {name!r}: cannot import ({exc})") from None
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"reward {name!r}: not 'vader', 'module:function' or a local sequence-classification model dir")
    from ..rl.reward_model import RewardModel

    return RewardModel.from_pretrained(str(path), policy_tokenizer=policy_tokenizer, device=device)


def launch(args, cfg) -> int:
    """``--nproc N``: re-run this command under torchrun with N processes on this machine.

    The workers' output is passed through; torchrun's own report of a failed
    worker (a traceback of the launcher) is shown only when no worker said
    what went wrong. A worker's bad-input error ends this command with exit 2.
    """
    import os
    import re
    import subprocess
    import sys

    from ..rl.io import check_writable

    check_writable(cfg.out)  # fail here, in one line, rather than in N workers
    if (cfg.batch_size // cfg.group_size) % args.nproc:
        raise ValueError(f"--nproc {args.nproc}: the {cfg.batch_size // cfg.group_size} prompts of each update "
                         f"(batch_size {cfg.batch_size} / group_size {cfg.group_size}) must split evenly over the processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "klbelt", "train"]
    for flag in ("config", "resume"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    for key, value in overrides(args).items():
        cmd += [f"--{key}", value]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, without its banner
    launcher_line = re.compile(r"^[WEI]\d{4} \d\d:\d\d:\d\d")  # torchrun's agent logging
    from ..rl.distributed import parent_death_kills

    # torchrun dies with this command (and its workers with torchrun): a killed `klbelt train --nproc N`
    # leaves nothing running that could still write to the run folder
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=parent_death_kills())
    prefix = "klbelt train: error:"
    errors, held, launcher_talking = [], [], False
    for line in proc.stderr:
        launcher_talking = launcher_talking or bool(launcher_line.match(line))
        if prefix in line:  # (two ranks' lines can arrive merged, or one cut by the launcher's SIGTERM)
            errors += [part.strip() for part in line.split(prefix)[1:] if part.strip()]
        elif launcher_talking:
            held.append(line)
        else:
            sys.stderr.write(line)
    code = proc.wait()
    shown: list[str] = []
    for message in errors:  # every rank reports the same bad input: say it once
        if not any(s.startswith(message) or message.startswith(s) for s in shown):
            shown.append(message)
            sys.stderr.write(f"{prefix} {message}\n")
    if code != 0 and not errors:
        sys.stderr.writelines(held)
    return 2 if errors else code


def merged_config(args):
    """Defaults, then ``--config FILE`` (or ``--resume DIR``'s config.json), then the command-line fields."""
    import os
    import sys

    from ..rl.config import TrainConfig
    from ..rl.fields import canonical

    notes: list[str] = []
    if args.resume:
        if args.config:
            raise ValueError("--resume DIR reads DIR/config.json: give --resume or --config, not both")
        base = TrainConfig.from_file(Path(args.resume) / "config.json").to_dict()
    elif args.config:
        base = TrainConfig.from_file(args.config, notes).to_dict()
    else:
        base = {}
    given, said = canonical(TrainConfig, overrides(args), where="command-line")
    notes += [n.replace("command-line key '", "--").replace("' read as", " read as") for n in said]
    if args.resume and given.get("out", args.resume) != args.resume:
        raise ValueError(f"--out {given['out']}: --resume {args.resume} continues in its own folder")
    values = {**base, **given, **({"out": args.resume} if args.resume else {})}
    cfg = TrainConfig.from_dict(values)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"klbelt train: {note}", file=sys.stderr)
    return cfg


def run(args) -> int:
    import sys

    from ..rl.distributed import init_from_env, rank_device

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if not (args.config or args.resume or args.print_config or overrides(args)):
        raise ValueError("give --config FILE, --resume DIR or config fields such as --model demo (see --help)")
    cfg = merged_config(args)
    if args.print_config:
        from ..rl.fields import dump_yaml

        sys.stdout.write(dump_yaml(cfg.to_dict()))
        return 0
    from ..rl.device import check_device

    check_device(cfg.device)  # before any model loads: 'cuda' on a machine without CUDA is refused by name
    if args.nproc > 1:
        return launch(args, cfg)
    world = init_from_env(cfg.device)
    cfg = replace(cfg, device=rank_device(cfg.device, world))
    try:
        return train_and_save(args, cfg, world)
    finally:
        import torch.distributed as dist

        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_and_save(args, cfg, world) -> int:
    from ..rl.io import save_pretrained_atomic
    from ..rl.trainer import train
    from .progress import Progress

    model, tokenizer = load_policy(cfg.model)
    prompts = load_prompts(cfg.prompts, tokenizer)
    reward = load_reward(cfg.reward, tokenizer, cfg.device)
    gold = None
    if cfg.model in ("demo", "tiny") and cfg.prompts == "demo":
        from ..demo.rewards import gold_reward as gold
    elif cfg.prompts == "english":
        from ..demo.english import english_gold_reward as gold
    if world.is_main:
        procs = f", {world.size} processes" if world.size > 1 else ""
        print(f"klbelt train: {cfg.model}, {len(prompts)} prompts, {cfg.steps} updates{procs}, out={cfg.out}")
    history = train(
        cfg, model, tokenizer, prompts, reward, gold_fn=gold, resume=bool(args.resume),
        on_step=Progress(cfg.steps) if world.is_main else None, warn_alerts=False,
    )
    if not world.is_main:
        return 0
    if history:
        last = history[-1]
        print(f"done: reward {last['reward']:+.3f}, KL {last['kl']:.4f} nats/token, beta {last['kl_coef']:.4f}")
    save_pretrained_atomic(model, tokenizer, Path(cfg.out) / "policy")
    return 0
