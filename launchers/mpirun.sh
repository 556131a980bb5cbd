#!/usr/bin/env bash
# Launch `hfdist hyperfit` with mpirun, one rank per GPU. hfdist reads rank and world size from MPI (mpi4py),
# takes the local rank from the ranks sharing a host, and broadcasts rank 0's host name and a free port as the
# rendezvous, so no MASTER_ADDR is needed. Works with PyPI's `mpich` (mpiexec in the venv) and Debian's OpenMPI.
#
# One node, 8 GPUs:
#   NP=8 launchers/mpirun.sh configs/paper-llama-3.1-8b.yaml --output-dir runs/8b
# Two nodes (MPICH hydra: -hosts / -ppn; OpenMPI: -H host:slots):
#   NP=16 PPN=8 HOSTS=node0,node1 launchers/mpirun.sh configs/paper-llama-3.1-70b.yaml --output-dir /shared/runs/70b
# Environment: NP (2), PPN (ranks per node), HOSTS (comma-separated), MPIRUN (mpirun from PATH), PYTHON (python).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
NP=${NP:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/hfdist/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(-n "$NP")
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
  # OpenMPI: hosts as host:slots, and forward the environment hfdist needs to the remote ranks.
  if [[ -n "${HOSTS:-}" ]]; then
    args+=(-H "$(echo "$HOSTS" | sed "s/\([^,]*\)/\1:${PPN:-$NP}/g")")
  fi
  args+=(--bind-to none -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x TORCH_EXTENSIONS_DIR -x OMP_NUM_THREADS
         -x HF_HOME -x HF_HUB_OFFLINE)
else
  # MPICH / Intel MPI (hydra): the whole environment travels by default.
  [[ -n "${HOSTS:-}" ]] && args+=(-hosts "$HOSTS")
  [[ -n "${PPN:-}" ]] && args+=(-ppn "$PPN")
fi

exec "$MPIRUN" "${args[@]}" "$PYTHON" -m hfdist.cli hyperfit "$@"
