#!/usr/bin/env bash
# The kernel part of the GPU check (issue 26): the Triton kernels against float64 at full size
# (4096 x 151936 logits, four LM-head shapes), then `klbelt bench kernels --device cuda` and
# `klbelt bench fused --device cuda`, printed as one table with the issue's targets.
# Without a GPU: scripts/gpu_check_kernels.sh --device cpu --tiny  (Triton's interpreter, tiny shapes).
# Extra arguments go to python -m klbelt.bench.gpu_check_kernels (--no-bench, --repeats N, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m klbelt.bench.gpu_check_kernels "$@"
