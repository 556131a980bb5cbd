#!/usr/bin/env bash
# Launch `hfdist hyperfit` with torchrun (c10d rendezvous), one process per GPU, on one or many nodes.
#
# Single node, 8 GPUs:
#   launchers/torchrun.sh configs/paper-llama-3.1-8b.yaml --output-dir runs/8b
# Two nodes: run the same command on each node, with the same MASTER_ADDR (a host of node 0) and RDZV_ID:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/torchrun.sh configs/paper-llama-3.1-70b.yaml --output-dir /shared/runs/70b
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launchers/torchrun.sh configs/paper-llama-3.1-70b.yaml --output-dir /shared/runs/70b
# Environment: NNODES (1), NODE_RANK (0), GPUS_PER_NODE (the GPUs nvidia-smi lists, else 1), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), RDZV_ID (hfdist), PYTHON (python), MAX_RESTARTS (0: with N > 0 torchrun
# restarts the job after a failure and it continues from its latest complete checkpoint), PREEMPT_GRACE_S (300).
# Everything after the config goes to `hfdist hyperfit` (--set ..., --output-dir, --resume). The run folder must be
# on a filesystem all nodes share.
# Preemption: SIGTERM or SIGUSR1 sent to this process (torchrun's agent, hfdist.distributed.run) reaches every worker,
# which stops after its current step with a checkpoint; the launcher then exits 75. PREEMPT_GRACE_S is how long the
# agent waits for that before it kills the workers (a step plus a checkpoint write; torchrun's own default is 30 s).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# DeepSpeed JIT-builds small ops on first use; keep them in one cache across runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/hfdist/torch_extensions}
# One OpenMP thread per process unless told otherwise (torchrun's default, said here so it is not a surprise).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store for every restart attempt: the shared one keeps the failed attempt's keys
# (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# torchrun's wait between forwarding a signal to the workers and killing them (torch builds that read it).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${PREEMPT_GRACE_S:-300}}

# torchrun, with SIGUSR1 handled and the workers' preemption exit code (75) passed on: hfdist/distributed/run.py.
exec "$PYTHON" -m hfdist.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-hfdist}" \
  -m hfdist.cli hyperfit "$@"
