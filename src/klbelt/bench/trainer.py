"""``klbelt bench trainer``: whole PPO updates per second, klbelt's trainer against TRL's PPOTrainer and the floor.

Both trainers do identical work: a GPT-2 policy (``--layers`` x ``--dim``,
``--vocab`` tokens, random init from one seed), a frozen reference (a copy of
the policy), a value model (the policy's trunk with a zero scalar head) and a
reward model (a GPT-2 sequence classifier) of the same size; the same prompts
(``--prompt-len`` tokens, no padding), full-length responses (klbelt:
``block_eos``; TRL: no stop token), the same epochs x minibatches with one
AdamW step per minibatch, fp32 on the CPU with ``--threads`` threads, k1 KL in
the reward, GAE, whitened advantages. The settings:

* A: batch 8, 16 response tokens, 1 epoch x 1 minibatch (overhead-bound);
* B: batch 64, 32 response tokens, 4 epochs x 4 minibatches (compute-bound).

Timing: each measurement runs in a fresh process; klbelt and TRL alternate
(``--runs`` each, the order flipping every run) so machine drift hits both
alike. A run trains ``--warmup`` + ``--updates`` updates; an update's time runs
from the end of the update before it to its own end (a whole update:
rollout, scoring, advantages, optimisation, logging, TRL's gc.collect()).
The reported time is the median over every timed update of every run (robust
to other processes taking the CPU for a while); tokens/s = batch x response
tokens / that time.

TRL is configured for the same work: ``per_device_train_batch_size`` = batch,
``gradient_accumulation_steps=1``, ``num_mini_batches`` and ``num_ppo_epochs``
as the setting, ``local_rollout_forward_batch_size`` = batch,
``response_length`` = response tokens with ``stop_token=None``, no gradient
checkpointing (PPOConfig's default recomputes the forward), fp32 (no bf16),
``num_sample_generations=0``, no saving, no reporting. What remains TRL's own
way of doing things is measured with it: ``generate()``, logits and values
over every position, one AdamW over policy + value, two ``gc.collect()`` per
update. (klbelt does a little more: it clips each model's gradient norm.)

The floor: with the same Hugging Face modules, the passes no PPO update can
avoid, timed alone in ``--floor-repeats`` rounds over all passes (median per
pass): the generation steps (prompt pass + one cached decode step per further
token, sampling included), one reference, value and reward forward over the
batch, and epochs x minibatches x (policy forward+backward, value
forward+backward, the two AdamW steps). Like any batched trainer it passes
attention masks and position ids, and computes logits and values at the
response positions only. ``floor_ratio`` = klbelt seconds per update / floor
seconds; ``floor_parts_s`` says what the floor is made of.

Peak memory (``*_peak_mb``): measured in one more run per trainer, with
glibc returning every freed block of 64 KiB or more to the OS (see
``klbelt.bench._memory``) so resident memory follows live memory: the peak
resident size during training (reset via ``/proc/self/clear_refs`` just
before it starts) minus the resident size then. At that point libraries are
imported, the shared models (policy, reference, reward) are built and one
throwaway pass of each kind has run (so code pages and thread pools are paid
for alike); the value model, optimiser state, gradients and activations
count. ``None`` where the peak cannot be reset (not Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from ._memory import _status_kib, reset_peak

DESCRIPTION = "tokens/s of whole PPO updates: klbelt's trainer vs TRL's PPOTrainer and the floor (settings A and B)"

SETTINGS = {
    "A": {"batch": 8, "response_tokens": 16, "epochs": 1, "minibatches": 1},
    "B": {"batch": 64, "response_tokens": 32, "epochs": 4, "minibatches": 4},
}
TARGETS = {"A": {"speedup": 8.0, "floor_ratio": 1.6}, "B": {"speedup": 1.4, "floor_ratio": 1.15}}
RESULT_MARK = "KLBELT_BENCH_RESULT "


def add_arguments(parser) -> None:
    parser.add_argument("--settings", default="A,B", help="comma-separated settings to run (A, B)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates at the start of each run")
    parser.add_argument("--updates", type=int, default=6, help="timed updates per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer (klbelt and TRL alternate)")
    parser.add_argument("--floor-repeats", type=int, default=15, help="timed repeats of each floor pass (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every measured process")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 layers of every model")
    parser.add_argument("--dim", type=int, default=128, help="GPT-2 hidden size of every model")
    parser.add_argument("--heads", type=int, default=4, help="GPT-2 attention heads")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (word-level tokenizer built locally)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=None, help="override the settings' batch size")
    parser.add_argument("--response-tokens", type=int, default=None, help="override the settings' response length")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (klbelt and the floor only)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per setting")
    parser.add_argument("--json-out", default=None, help="also write that JSON list to this file")
    parser.add_argument("--model", default=None,
                        help="smollm2 or a local causal-LM directory: time the English demo's update on that model "
                        "against TRL's GRPOTrainer and the floor instead (see klbelt.bench.real_model)")
    parser.add_argument("--memory", action="store_true", help="with --model: peak memory of one update with full logits vs the fused LM head")
    parser.add_argument("--memory-batch", type=int, default=64, help="with --memory: sequences (default 64)")
    parser.add_argument("--memory-tokens", type=int, default=128, help="with --memory: response tokens (default 128)")
    parser.add_argument("--trl-python", default=None, help="with --model: run the TRL side under this Python (e.g. a venv with the newest TRL)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec


# --------------------------------------------------------------------------- shared set-up (in each child)


def _tokenizer(vocab: int):
    """A word-level PreTrainedTokenizerFast: words w0..w{V-3}, <eos>, <pad> (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 2)] + ["<eos>", "<pad>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def _build(spec: dict):
    """Tokenizer, prompts, and the shared models: policy, reference (a copy) and reward model."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = _tokenizer(spec["vocab"])
    config = GPT2Config(
        vocab_size=spec["vocab"], n_positions=max(64, spec["prompt_len"] + spec["response_tokens"]), n_embd=spec["dim"],
        n_layer=spec["layers"], n_head=spec["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_labels=1,
    )
    torch.manual_seed(spec["seed"])
    policy = GPT2LMHeadModel(config).eval()
    ref = copy.deepcopy(policy)
    torch.manual_seed(spec["seed"] + 1)
    reward = GPT2ForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    ids = torch.randint(0, spec["vocab"] - 2, (256, spec["prompt_len"]), generator=g)
    prompts = [" ".join(f"w{i}" for i in row) for row in ids.tolist()]
    return tok, prompts, policy, ref, reward


def _prewarm(policy, reward, prompt_ids) -> None:
    """Run every kind of pass once on throwaway copies, so code pages, thread pools and allocator
    arenas that any trainer needs are resident before the memory baseline is taken (both sides alike)."""
    import copy
    import gc

    import torch

    from klbelt.rl.rollout import _cache_kwarg, _returned_cache

    model = copy.deepcopy(policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with torch.no_grad():
        out = model(input_ids=prompt_ids, use_cache=True)
        model(input_ids=prompt_ids[:, -1:], use_cache=True, **{_cache_kwarg(model): _returned_cache(out)})
        reward(input_ids=prompt_ids)
    model(input_ids=prompt_ids).logits.float().log_softmax(-1).mean().backward()
    opt.step()
    del model, opt, out
    gc.collect()


def _reset_peak() -> int | None:
    """Reset the resident high-water mark; the resident KiB now, or None where unsupported.

    Memory freed between the reset and the check makes the check fail; retry a few times.
    """
    for _ in range(10):
        try:
            reset_peak()
            hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
        except OSError:
            return None
        if hwm <= rss + 64:
            return rss
        time.sleep(0.01)
    return None


def _peak_mb(rss_before: int | None) -> float | None:
    return None if rss_before is None else max(0, _status_kib("VmHWM") - rss_before) / 1024


def _intervals(ends: list[float], warmup: int, updates: int) -> list[float]:
    """Seconds of each timed update: from the end of the update before it to its own end."""
    timed = ends[warmup - 1 : warmup + updates]
    return [b - a for a, b in zip(timed, timed[1:])]


# --------------------------------------------------------------------------- the three measured children


class _Stop(Exception):
    pass


def _child_klbelt(spec: dict) -> dict:
    import tempfile

    import torch

    from klbelt.rl.config import TrainConfig
    from klbelt.rl.reward_model import RewardModel
    from klbelt.rl.trainer import train

    tok, prompts, policy, ref, reward = _build(spec)
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    def on_step(record):
        ends.append(time.perf_counter())
        if len(ends) == total:
            raise _Stop  # before the extra step that would write the final checkpoint

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model="bench", reward="bench", seed=spec["seed"], steps=total + 1, batch_size=spec["batch"],
            max_new_tokens=spec["response_tokens"], temperature=1.0, block_eos=True, kl_in="reward", kl_estimator="k1",
            kl_coef=0.05, controller="fixed", advantage="gae", ppo_epochs=spec["epochs"], minibatches=spec["minibatches"],
            lr=1e-5, critic_lr=1e-5, out=out, checkpoint_every=10**9, samples_every=10**9,
        )
        scorer = RewardModel(reward, tok)
        _prewarm(policy, reward, tok(prompts[: spec["batch"]], return_tensors="pt")["input_ids"])
        torch.manual_seed(spec["seed"])
        rss = _reset_peak()
        try:
            train(cfg, policy, tok, prompts, scorer, ref_policy=ref, on_step=on_step)
        except _Stop:
            pass
        peak = _peak_mb(rss)
    return {"intervals": _intervals(ends, spec["warmup"], spec["updates"]), "peak_mb": peak}


def _child_trl(spec: dict) -> dict:
    import tempfile
    import warnings

    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    tok, prompts, policy, ref, reward = _build(spec)
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    total = spec["warmup"] + spec["updates"]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, seed=spec["seed"], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
            per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
            num_mini_batches=spec["minibatches"], num_ppo_epochs=spec["epochs"], local_rollout_forward_batch_size=spec["batch"],
            response_length=spec["response_tokens"], stop_token=None, missing_eos_penalty=None, temperature=1.0,
            kl_coef=0.05, kl_estimator="k1", learning_rate=1e-5, total_episodes=spec["batch"] * total,
            num_sample_generations=0, dataloader_num_workers=0,
        )
        _prewarm(policy, reward, tok(prompts[: spec["batch"]], return_tensors="pt")["input_ids"])
        torch.manual_seed(spec["seed"])
        rss = _reset_peak()
        # TRL's value model: a sequence classifier on a copy of the policy's trunk, zero head (klbelt's init)
        value = GPT2ForSequenceClassification(policy.config)
        value.transformer.load_state_dict(policy.transformer.state_dict())
        torch.nn.init.zeros_(value.score.weight)
        trainer = PPOTrainer(
            args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward, train_dataset=dataset,
            value_model=value, callbacks=[Clock()],
        )
        trainer.train()
        peak = _peak_mb(rss)
    if len(ends) != total:
        raise RuntimeError(f"TRL ran {len(ends)} updates, expected {total}")
    return {"intervals": _intervals(ends, spec["warmup"], spec["updates"]), "peak_mb": peak,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__}


def _child_floor(spec: dict) -> dict:
    """Each unavoidable pass of one update, timed alone with the same Hugging Face modules (seconds, medians)."""
    import copy

    import torch
    from torch import nn

    from klbelt.kl import logprobs_from_logits
    from klbelt.rl.rollout import _cache_kwarg, _returned_cache

    tok, prompts, policy, ref, reward = _build(spec)
    B, R, E, M = spec["batch"], spec["response_tokens"], spec["epochs"], spec["minibatches"]
    mb = B // M
    enc = tok(prompts[:B], return_tensors="pt", padding=True)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    P = prompt_ids.shape[1]
    trunk = copy.deepcopy(policy.transformer).train(False)
    head = nn.Linear(spec["dim"], 1)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    value_opt = torch.optim.AdamW(list(trunk.parameters()) + list(head.parameters()), lr=1e-5)
    gen = torch.Generator().manual_seed(spec["seed"])
    cache_kw = _cache_kwarg(policy)

    def positions(mask):
        return (mask.cumsum(-1) - 1).clamp_min(0)

    @torch.no_grad()
    def generate():
        mask = prompt_mask
        out = policy(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1)
        pos = positions(mask)[:, -1:] + 1
        tokens = []
        for step in range(R):
            token = torch.multinomial(torch.softmax(out.logits[:, -1], -1), 1, generator=gen)
            tokens.append(token)
            if step + 1 == R:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = policy(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: _returned_cache(out)})
            pos = pos + 1
        return torch.cat([prompt_ids] + tokens, 1)

    seq = generate()
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, R)], 1)
    pos_full = positions(full_mask)
    responses = seq[:, P:]

    def values_of(rows):
        hidden = trunk(input_ids=seq[rows], attention_mask=full_mask[rows], position_ids=pos_full[rows]).last_hidden_state
        return head(hidden[:, P - 1 : -1]).squeeze(-1)

    @torch.no_grad()
    def ref_forward():
        return ref(input_ids=seq, attention_mask=full_mask, position_ids=pos_full, logits_to_keep=R + 1).logits

    @torch.no_grad()
    def value_forward():
        return values_of(slice(None))

    @torch.no_grad()
    def reward_forward():
        hidden = reward.transformer(input_ids=seq, attention_mask=full_mask, position_ids=pos_full).last_hidden_state
        return reward.score(hidden[:, -1])

    rows = slice(0, mb)

    def policy_fb():
        policy.zero_grad(set_to_none=True)
        logits = policy(input_ids=seq[rows], attention_mask=full_mask[rows], position_ids=pos_full[rows], logits_to_keep=R + 1).logits
        logprobs_from_logits(logits[:, :-1], responses[rows]).mean().backward()

    def value_fb():
        trunk.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        values_of(rows).square().mean().backward()

    policy_fb()
    value_fb()  # gradients exist, so the optimiser steps below do the full update

    def opt_steps():
        policy_opt.step()
        value_opt.step()

    passes = {
        "generation": (generate, 1),
        "ref_forward": (ref_forward, 1),
        "value_forward": (value_forward, 1),
        "reward_forward": (reward_forward, 1),
        "policy_forward_backward": (policy_fb, E * M),
        "value_forward_backward": (value_fb, E * M),
        "optimizer_steps": (opt_steps, E * M),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for round_ in range(2 + spec["floor_repeats"]):  # rounds over all passes, so drift hits them alike; 2 untimed
        for name, (fn, _) in passes.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - t0)
    parts = {name: count * statistics.median(times[name]) for name, (_, count) in passes.items()}
    return {"seconds_per_update": sum(parts.values()), "parts": parts}


CHILDREN = {"klbelt": _child_klbelt, "trl": _child_trl, "floor": _child_floor}


def child_main(spec_json: str) -> int:
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    result = CHILDREN[spec["side"]](spec)
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def _measure(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    if spec.get("mode") == "memory":
        from ._memory import CHILD_ENV

        env.update(CHILD_ENV)  # freed blocks go back to the OS: resident size follows live memory
    proc = subprocess.run(
        [sys.executable, "-m", "klbelt.bench.trainer", "--child", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark process ({spec['side']}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


# --------------------------------------------------------------------------- the parent


def run(args) -> int:
    if args.child is not None:
        return child_main(args.child)
    if args.model is not None:
        from . import real_model

        return real_model.run_memory(args) if args.memory else real_model.run(args)
    names = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        print(f"klbelt bench trainer: --settings must list settings from {', '.join(SETTINGS)}; got {args.settings!r}", file=sys.stderr)
        return 2
    for name in ("warmup", "updates", "runs", "floor_repeats", "threads"):
        if getattr(args, name) < 1:
            print(f"klbelt bench trainer: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    rows = []
    for name in names:
        setting = dict(SETTINGS[name])
        if args.batch is not None:
            setting["batch"] = args.batch
        if args.response_tokens is not None:
            setting["response_tokens"] = args.response_tokens
        if setting["batch"] % setting["minibatches"]:
            print(f"klbelt bench trainer: batch {setting['batch']} must divide by {setting['minibatches']} minibatches", file=sys.stderr)
            return 2
        base = dict(setting, warmup=args.warmup, updates=args.updates, threads=args.threads, layers=args.layers,
                    dim=args.dim, heads=args.heads, vocab=args.vocab, prompt_len=args.prompt_len, seed=0,
                    floor_repeats=args.floor_repeats, mode="time")
        sides = ["klbelt"] if args.no_trl else ["klbelt", "trl"]
        results: dict[str, list[dict]] = {"klbelt": [], "trl": [], "floor": []}
        for r in range(args.runs):
            for side in (sides if r % 2 == 0 else sides[::-1]) + ["floor"]:
                results[side].append(_measure(dict(base, side=side)))
        memory = {side: _measure(dict(base, side=side, mode="memory", updates=min(args.updates, 2))) for side in sides}
        rows.append(_row(name, setting, args, results, memory))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, args)
    return 0


def _row(name: str, setting: dict, args, results: dict, memory: dict) -> dict:
    tokens = setting["batch"] * setting["response_tokens"]

    def seconds(side):  # median over every timed update of every run
        pooled = [x for r in results[side] for x in r["intervals"]]
        return statistics.median(pooled) if pooled else None

    k_s, t_s = seconds("klbelt"), seconds("trl")
    parts = {p: statistics.median(r["parts"][p] for r in results["floor"]) for p in results["floor"][0]["parts"]}
    f_s = sum(parts.values())
    row = {
        "setting": name,
        **setting,
        "klbelt_tokens_per_s": tokens / k_s,
        "trl_tokens_per_s": tokens / t_s if t_s else None,
        "speedup": t_s / k_s if t_s else None,
        "floor_tokens_per_s": tokens / f_s,
        "floor_ratio": k_s / f_s,
        "klbelt_peak_mb": memory["klbelt"]["peak_mb"],
        "trl_peak_mb": memory["trl"]["peak_mb"] if "trl" in memory else None,
        "klbelt_s_per_update": k_s,
        "trl_s_per_update": t_s,
        "floor_s_per_update": f_s,
        "floor_parts_s": parts,
        "klbelt_runs_s": [statistics.median(r["intervals"]) for r in results["klbelt"]],
        "trl_runs_s": [statistics.median(r["intervals"]) for r in results["trl"]],
        "trl_optimizer": results["trl"][0].get("optimizer") if results["trl"] else None,
        "runs": args.runs, "warmup": args.warmup, "updates": args.updates, "threads": args.threads,
        "model": f"GPT-2 {args.layers} layers x {args.dim} dims, {args.heads} heads, vocab {args.vocab}, prompt {args.prompt_len} tokens",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    target = TARGETS.get(name)
    if target and row["speedup"] is not None:
        row["targets"] = dict(target, peak="klbelt_peak_mb <= trl_peak_mb")
        row["meets_targets"] = {
            "speedup": row["speedup"] >= target["speedup"],
            "floor_ratio": row["floor_ratio"] <= target["floor_ratio"],
            "peak": None if row["klbelt_peak_mb"] is None or row["trl_peak_mb"] is None else row["klbelt_peak_mb"] <= row["trl_peak_mb"],
        }
    return row


def _fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def _print_table(rows: list[dict], args) -> None:
    print(f"PPO updates, steady state: median update time over {args.runs} alternating runs x {args.updates} timed updates "
          f"(after {args.warmup} warm-up), {args.threads} thread(s), fp32 CPU; {rows[0]['model']}")
    head = f"{'setting':<8}{'klbelt tok/s':>13}{'TRL tok/s':>11}{'speedup':>9}{'floor tok/s':>13}{'klbelt/floor':>14}{'klbelt MB':>11}{'TRL MB':>9}"
    print(head)
    for r in rows:
        label = f"{r['setting']} {r['batch']}x{r['response_tokens']}"
        print(f"{label:<8}{_fmt(r['klbelt_tokens_per_s']):>13}{_fmt(r['trl_tokens_per_s']):>11}{_fmt(r['speedup'], '{:.2f}x'):>9}"
              f"{_fmt(r['floor_tokens_per_s']):>13}{_fmt(r['floor_ratio'], '{:.2f}x'):>14}"
              f"{_fmt(r['klbelt_peak_mb'], '{:.1f}'):>11}{_fmt(r['trl_peak_mb'], '{:.1f}'):>9}")
    for r in rows:
        parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in r["floor_parts_s"].items())
        print(f"floor {r['setting']} (ms per update): {parts}")
    print("MB = peak growth of resident memory during training over the process's size when it starts (libraries loaded, "
          "shared models built, one throwaway pass of each kind run), in a separate run with glibc returning freed blocks.")
    print(f"load average at the end: {rows[-1]['load_average']}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
