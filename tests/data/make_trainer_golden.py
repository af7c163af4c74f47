"""Record the trainer's metrics on a set of configurations, to prove later refactors change nothing.

Run with the code before a refactor (``python tests/data/make_trainer_golden.py``);
``tests/test_trainer_golden.py`` then runs the same configurations with the current
code and compares every metric: bit for bit on a machine like the one that
recorded them (same ``klbelt._machine.float_kernel_signature``: torch version,
CPU capability, bf16 support, CPU vendor, model and ISA extensions), else the
fp32 runs within rel 1e-4.
The configurations cover every option ``train()`` chooses before its loop:
critic (GAE) or group baseline, KL in the reward or the loss, each controller,
LoRA with bf16, the bf16 sampler with each rollout correction, log-ratio
clamping, the entropy bonus, unwhitened advantages, and the tiny demo task itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ for tiny_models

from tiny_models import tiny_gpt2, word_tokenizer  # noqa: E402

WORDS = ["good", "bad", "day", "night", "is", "the", "a", "!"]
PROMPTS = ["the day", "the night is", "a good", "bad", "the", "night", "a day is", "good day"]
BASE = dict(steps=4, batch_size=8, max_new_tokens=5, ppo_epochs=2, minibatches=2, lr=1e-2, critic_lr=1e-2,
            checkpoint_every=2, samples_every=2)
CONFIGS = {
    "gae-reward-pid": dict(advantage="gae", kl_in="reward", controller="pid", kl_coef=0.2, target_kl=0.01),
    "group-loss-k3-adaptive-seq": dict(advantage="group", group_size=2, kl_in="loss", kl_estimator="k3",
                                       controller="adaptive", kl_unit="seq-sum", kl_coef=0.2, target_kl=0.05),
    "group-loss-k2-fixed": dict(advantage="group", group_size=4, kl_in="loss", kl_estimator="k2", controller="fixed",
                                kl_coef=0.3, minibatches=1),
    "gae-proportional-clamp-entropy": dict(controller="proportional", horizon=64, log_ratio_clamp=0.05,
                                           clamp_gradient="pass", entropy_coef=0.01, whiten_advantages=False,
                                           kl_coef=0.5, target_kl=0.02),
    "lora-bf16-group": dict(lora_rank=4, bf16=True, advantage="group", group_size=2, controller="pid",
                            kl_coef=0.1, target_kl=0.02, lr=5e-2),
    "bf16-sampler-tis": dict(sampler="bf16", rollout_correction="tis", is_cap=2.0, controller="pid", kl_coef=0.2,
                             target_kl=0.01),
    "bf16-sampler-mis-group": dict(sampler="bf16", rollout_correction="mis", is_band=[0.5, 1.5], advantage="group",
                                   group_size=2, kl_in="loss", kl_estimator="k3"),
    "bf16-sampler-band-unfused": dict(sampler="bf16", rollout_correction="band", fused_head=False, top_k=4, top_p=0.9,
                                      temperature=0.8),
}
DEMO_STEPS = 3
HISTORY = (
    "First recorded at c1228a1, before train() was split into named steps; the refactor (31230e3) reproduced "
    "those metrics bit for bit. Re-recorded after two deliberate numeric changes that followed it: the fused "
    "LM head's new row-block size (issue 15: sums over other blocks round differently; bf16 entropy moved by "
    "1e-5, which changed the lora-bf16-group run's samples from update 1 on, and the tiny demo's KL by up to "
    "4e-5 relative) and the mismatch metrics' global means over ranks (issue 13: is_weight_mean by 1e-7). Re-recorded "
    "again when ``logits_to_keep`` became an index tensor (contiguous hidden rows; a bf16 linear layer on "
    "the old strided view took a batched-matmul path 14x slower): bf16 rounding moved, so the lora-bf16-group "
    "run's next beta moved by 7e-7 relative at update 2 and its samples from there on; every other run was unchanged "
    "to the bit. The signature (not the metrics) was widened for issue 22: torch's \"AVX512\" was shared by an AMD "
    "EPYC (AVX512-BF16) and an Intel Xeon (AMX, AVX512-FP16) whose kernels round differently, so it now also names the "
    "CPU's vendor, model and dispatch ISA extensions (klbelt._machine.float_kernel_signature); an AMD EPYC of family 26 "
    "reproduced every recorded metric bit for bit with the code of that change, and its signature is the one stored. "
    "Re-recorded for issue 24's two deliberate changes, every other run unchanged to the bit: (1) "
    "kl_ratio_correction (default true) weighs the KL in the loss by pi_theta/pi_old, which moves the three kl_in: loss "
    "runs (group-loss-k3-adaptive-seq, group-loss-k2-fixed, bf16-sampler-mis-group; with kl_ratio_correction false "
    "they reproduce the previous recording bit for bit); (2) top_k/top_p are a sampler: the rollout records the "
    "filtered distribution's log-probs and the observed KL is the exact full-vocabulary KL, which moves "
    "bf16-sampler-band-unfused (its mismatch_kl is now the filter's 0.8 nats/token instead of the bf16 noise, it "
    "logs filtered_mass, and the band correction zeroes every token's weight since pi/mu = the kept mass < 0.5)."
)


def gold(texts, ref_nll):
    return torch.tensor([t.count("good") - 0.5 * float(n) for t, n in zip(texts, ref_nll)], dtype=torch.float32)


def score(texts):
    return torch.tensor([t.split().count("good") - t.split().count("bad") + 0.5 * t.count("!") for t in texts],
                        dtype=torch.float32)


def signature() -> dict:
    """torch, its CPU capability, bf16 support, and the CPU's vendor, model and dispatch ISA extensions."""
    from klbelt._machine import float_kernel_signature

    return float_kernel_signature()


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def run_config(name: str, out: Path) -> list[dict]:
    from klbelt.rl.config import TrainConfig
    from klbelt.rl.trainer import train

    tok = word_tokenizer(WORDS)
    model = tiny_gpt2(len(tok), n_layer=2, seed=3)
    cfg = TrainConfig(**{**BASE, **CONFIGS[name]}, out=str(out))
    return strip(train(cfg, model, tok, PROMPTS, score, gold_fn=gold, warn_alerts=False))


def run_demo_steps(out: Path) -> list[dict]:
    """The tiny demo task (shipped model, prompts, proxy and gold) for its first updates."""
    from dataclasses import replace

    from klbelt.demo.task import DEMO_CONFIG, demo_inputs
    from klbelt.rl.trainer import train

    cfg = replace(DEMO_CONFIG, steps=DEMO_STEPS, batch_size=16, out=str(out))
    model, tokenizer, prompts, proxy, gold_fn = demo_inputs(cfg)
    return strip(train(cfg, model, tokenizer, prompts, proxy, gold_fn=gold_fn, warn_alerts=False))


def record_all() -> dict:
    torch.set_num_threads(1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            runs[name] = run_config(name, Path(tmp) / name)
        runs["demo-tiny"] = run_demo_steps(Path(tmp) / "demo")
    return {"signature": signature(), "runs": runs}


if __name__ == "__main__":
    import subprocess

    data = record_all()
    data["recorded_with"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=HERE).stdout.strip()
    data["history"] = HISTORY
    (HERE / "trainer_golden.json").write_text(json.dumps(data, indent=1) + "\n")
    print({k: len(v) for k, v in data["runs"].items()})
