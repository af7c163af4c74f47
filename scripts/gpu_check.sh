#!/usr/bin/env bash
# One command for a bare GPU machine: every trainer option for a few updates on the GPU (metrics
# against the CPU's), the English demo's update on the SmolLM2-shaped model with its time per
# update and its floor, the kernel checks and benchmarks on CUDA; one table at the end. Under 9 minutes
# (each step has a timeout: 120 + 70 + 140 + 180 s at most; the kernel step prints and saves each row as
# it is measured, so a step cut short keeps its rows).
#
#   scripts/gpu_check.sh [--wheels DIR] [--results DIR] [--device cuda] [--quick] [--no-benches]
#
# The machine needs torch (CUDA), transformers and peft; nothing is downloaded. The few wheels
# it lacks (VADER, the fortune corpus) come from --wheels DIR (default wheels/gpu_check, made by
# scripts/gpu_check_wheels.sh on a machine with network) and are installed with
# `pip install --no-deps --target` into a scratch folder; klbelt runs from this checkout.
# --device cpu --quick is the CI size of the same steps (tests/test_gpu_check.py runs it).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=wheels/gpu_check
RESULTS=${TMPDIR:-/tmp}/klbelt-gpu-check-$$
DEVICE=cuda
QUICK=()
BENCHES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=(--quick); shift ;;
        --no-benches) BENCHES=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
CHECK=("$PY" "$ROOT/scripts/gpu_check.py")
record() { "${CHECK[@]}" record --results "$RESULTS" --name "$1" --status "$2" --figure "${3:--}" --note "${4:-}"; }
started=$(date +%s)

# --- 0. the missing wheels, into a scratch folder on PYTHONPATH; the fortune files where the demo looks
DEPS="$RESULTS/deps"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-deps --no-index --target "$DEPS" "$WHEELS"/*.whl > "$RESULTS/pip.log" 2>&1; then
        record "wheels from $WHEELS" ok "$(ls "$WHEELS"/*.whl | wc -l) installed" "pip install --no-deps --target $DEPS"
    else
        record "wheels from $WHEELS" FAIL - "pip failed: $(tail -c 200 "$RESULTS/pip.log" | tr '\n' ' ')"
    fi
else
    record "wheels from $WHEELS" skipped - "no wheels there: what the environment already has is used"
fi
export PYTHONPATH="$ROOT/src:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
# pip --target puts data files under DIR/share/games/fortune, outside sys.prefix: point klbelt's corpus at them
if [ -d "$DEPS/share/games/fortune" ]; then export KLBELT_FORTUNE_DIR="$DEPS/share/games/fortune"; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1

env_line=$("$PY" -c "import torch, transformers, peft, klbelt; c = torch.cuda.is_available(); print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}, ' + (torch.cuda.get_device_name(0) if c else 'no GPU') + f'; klbelt from {klbelt.__file__}')" 2>&1 | tail -1)
record "environment" ok - "$env_line"

# --- 1. every trainer option on the device, metrics against the CPU's (scripts/gpu_check.py options)
timeout 120 "${CHECK[@]}" options --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/options.log" 2>&1 \
    || record "options step" FAIL - "exit $? (timeout 120 s = 124); see $RESULTS/options.log"

# --- 2. the sampler's decode loop: Hugging Face's, the static step eagerly, graphed (scripts/gpu_check.py decode)
timeout 70 "${CHECK[@]}" decode --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/decode.log" 2>&1 \
    || record "decode step" FAIL - "exit $? (timeout 70 s = 124); see $RESULTS/decode.log"

# --- 3. the English demo's update on the SmolLM2-shaped model, beside its floor (klbelt bench trainer --device)
timeout 140 "${CHECK[@]}" english --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/english.log" 2>&1 \
    || record "english step" FAIL - "exit $? (timeout 140 s = 124); see $RESULTS/english.log"

# --- 4. KERNEL CHECKS (issue 26): scripts/gpu_check_kernels.sh, the Triton kernels against float64 at full
# size and `klbelt bench kernels` / `klbelt bench fused` on the device in its own table (printed here)
if [ "$BENCHES" = 0 ]; then
    record "scripts/gpu_check_kernels.sh" skipped - "--no-benches"
elif [ -x scripts/gpu_check_kernels.sh ]; then
    KERNEL_ARGS=(--device "$DEVICE" --json "$RESULTS/kernels.json")
    [ ${#QUICK[@]} -gt 0 ] && KERNEL_ARGS+=(--tiny)
    if timeout 180 scripts/gpu_check_kernels.sh "${KERNEL_ARGS[@]}" > "$RESULTS/kernels.log" 2>&1; then
        record "scripts/gpu_check_kernels.sh ${KERNEL_ARGS[*]}" ok - "its table above; rows in $RESULTS/kernels.json"
    else
        record "scripts/gpu_check_kernels.sh ${KERNEL_ARGS[*]}" FAIL - "exit $? (timeout 180 s = 124); see $RESULTS/kernels.log"
    fi
    cat "$RESULTS/kernels.log"
else
    record "scripts/gpu_check_kernels.sh" skipped - "not in this checkout"
fi

record "gpu_check.sh" ok "$(( $(date +%s) - started )) s" "results in $RESULTS"
echo
"${CHECK[@]}" table --results "$RESULTS" | tee "$RESULTS/table.txt"
! grep -q " FAIL " "$RESULTS/table.txt"
