#!/usr/bin/env bash
# One prepared call on a GPU machine: the compiled kernel tests and kernel benchmarks, then training of the
# Llama 3.2 1B shape (random weights, bf16) at 8 x 256 and 4 x 2048 against the plain loop (hfdist eager and
# with compiled layers), then decoding of the same random model against model.generate (dynamic and static cache).
# Writes JSON (and logs) into $1. Runs from a source checkout: `pip install --no-deps --no-build-isolation -e .`
# first where hfdist is not installed. Each step has its own time limit; a failed step does not stop the rest.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
python=${PYTHON:-python}
status=0
bash benchmarks/gpu_suite_kernels.sh "$out" || status=1
for shape in "8 256" "4 2048"; do
  set -- $shape
  timeout "${TRAIN_BENCH_TIMEOUT:-150}" "$python" benchmarks/bench_train.py --model llama-3.2-1b --init random \
      --dtype bfloat16 --batch "$1" --seq-len "$2" --steps 5 --warmup 2 --impls plain,hfdist,hfdist-compile,hfdist-noprefetch \
      --out "$out" --tag "llama-3.2-1b_${1}x${2}" >>"$out/train.log" 2>&1 || status=1
done
timeout "${GENERATE_BENCH_TIMEOUT:-180}" "$python" benchmarks/bench_generate.py --model llama-3.2-1b --init random \
    --batch-sizes 1,32 --new-tokens 224 --repeats 2 --compile --out "$out" >>"$out/generate.log" 2>&1 || status=1
exit $status
