#!/usr/bin/env bash
# Launch `hfdist hyperfit` with the DeepSpeed launcher (ZeRO-3), locally or on the hosts of a hostfile.
#
# Single node, all GPUs:
#   launchers/deepspeed.sh configs/paper-llama-3.1-70b.yaml --output-dir runs/70b-zero3
# Several nodes (passwordless ssh to every host; the run folder on a shared filesystem):
#   HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh configs/paper-llama-3.1-70b.yaml --output-dir /shared/runs/70b
# Environment: HOSTFILE (none: this machine only), NUM_GPUS (per node; default all), MASTER_ADDR,
# MASTER_PORT (29500), DS_CONFIG (configs/deepspeed/zero3.json; zero3_offload.json offloads to CPU).
# The backend and DeepSpeed JSON are set here; later --set arguments override them.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
CONFIG=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DS_CONFIG=${DS_CONFIG:-$HERE/../configs/deepspeed/zero3.json}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/hfdist/torch_extensions}

args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")

exec deepspeed "${args[@]}" --module hfdist.cli hyperfit "$CONFIG" \
  --set distributed.backend=deepspeed --set "distributed.deepspeed_config=$DS_CONFIG" "$@"
