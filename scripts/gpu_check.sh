#!/usr/bin/env bash
# One command for a bare GPU machine: every trainer option for a few updates on the GPU (metrics
# against the CPU's), the English demo's update on the SmolLM2-shaped model with its time per
# update and its floor, the kernel benchmarks on CUDA; one table at the end. Under 8 minutes.
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
timeout 130 "${CHECK[@]}" options --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/options.log" 2>&1 \
    || record "options step" FAIL - "exit $? (timeout 130 s = 124); see $RESULTS/options.log"

# --- 2. the sampler's decode loop: Hugging Face's, the static step eagerly, graphed (scripts/gpu_check.py decode)
timeout 80 "${CHECK[@]}" decode --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/decode.log" 2>&1 \
    || record "decode step" FAIL - "exit $? (timeout 80 s = 124); see $RESULTS/decode.log"

# --- 3. the English demo's update on the SmolLM2-shaped model, beside its floor (klbelt bench trainer --device)
timeout 150 "${CHECK[@]}" english --results "$RESULTS" --device "$DEVICE" "${QUICK[@]}" > "$RESULTS/english.log" 2>&1 \
    || record "english step" FAIL - "exit $? (timeout 150 s = 124); see $RESULTS/english.log"

# --- 4. the kernel benchmarks on the device
if [ "$BENCHES" = 1 ]; then
    if timeout 45 "$PY" -m klbelt bench fused --device "$DEVICE" --quick --no-memory --json > "$RESULTS/bench_fused.json" 2> "$RESULTS/bench_fused.log"; then
        record "klbelt bench fused --device $DEVICE --quick" ok "$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))), 'rows')" "$RESULTS/bench_fused.json" 2>/dev/null)" "table in $RESULTS/bench_fused.json"
    else
        record "klbelt bench fused --device $DEVICE --quick" FAIL - "exit $?; see $RESULTS/bench_fused.log"
    fi
    # --- 4b. KERNEL CHECKS (issue 26): the Triton kernels' own check, wired by the lead when it lands
    if [ -x scripts/gpu_check_kernels.sh ]; then
        if timeout 60 scripts/gpu_check_kernels.sh > "$RESULTS/kernels.log" 2>&1; then
            record "scripts/gpu_check_kernels.sh" ok - "see $RESULTS/kernels.log"
        else
            record "scripts/gpu_check_kernels.sh" FAIL - "exit $?; see $RESULTS/kernels.log"
        fi
    else
        record "scripts/gpu_check_kernels.sh" skipped - "not in this checkout"
    fi
fi

record "gpu_check.sh" ok "$(( $(date +%s) - started )) s" "results in $RESULTS"
echo
"${CHECK[@]}" table --results "$RESULTS" | tee "$RESULTS/table.txt"
! grep -q " FAIL " "$RESULTS/table.txt"
