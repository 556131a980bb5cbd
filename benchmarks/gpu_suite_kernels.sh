#!/usr/bin/env bash
# The kernels' part of benchmarks/gpu_suite.sh: on one CUDA GPU, run the kernel tests compiled (not in the
# Triton interpreter) and both kernel benchmarks. Writes three files into $1 (the device tool returns at
# most 8 files): kernels.log (test summary + benchmark tables), bench_cross_entropy_cuda.json,
# bench_sampling_cuda.json.
# Typical: tests ~1.5 min (mostly Triton compilation), cross-entropy bench ~2.5 min, sampling bench ~1 min.
# Each step has its own time limit (seconds; override with the environment variables below), and the
# benchmarks rewrite their JSON after every measurement, so a step cut short still leaves its results.
# Exit status: 0 if every step passed, 1 otherwise (the later steps still run).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite_kernels.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py only sets it when unset)
python=${PYTHON:-python}
log="$out/kernels.log"
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$log" 2>&1

echo "== kernel tests (compiled)" >>"$log"
timeout "${KERNELS_TEST_TIMEOUT:-150}" "$python" -m pytest -q -p no:cacheprovider -rfEs \
    tests/test_kernels_cross_entropy.py tests/test_kernels_sampling.py tests/test_kernels_training.py \
    >>"$log" 2>&1 || { status=1; echo "== kernel tests FAILED or timed out" >>"$log"; }

echo "== bench_cross_entropy" >>"$log"
timeout "${KERNELS_CE_BENCH_TIMEOUT:-150}" "$python" benchmarks/bench_cross_entropy.py --device cuda --reps 3 \
    --no-md --out "$out" >>"$log" 2>&1 || { status=1; echo "== bench_cross_entropy FAILED or timed out" >>"$log"; }

echo "== bench_sampling" >>"$log"
timeout "${KERNELS_SAMPLING_BENCH_TIMEOUT:-75}" "$python" benchmarks/bench_sampling.py --device cuda --reps 10 \
    --no-md --out "$out" >>"$log" 2>&1 || { status=1; echo "== bench_sampling FAILED or timed out" >>"$log"; }

tail -n 60 "$log"
exit $status
