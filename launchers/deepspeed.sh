#!/usr/bin/env bash
# Launch `hfdist hyperfit` with the DeepSpeed launcher (ZeRO-3), locally or on the hosts of a hostfile.
#
# Single node, all GPUs:
#   launchers/deepspeed.sh configs/paper-llama-3.1-70b.yaml --output-dir runs/70b-zero3
# Several nodes (passwordless ssh to every host; the run folder on a shared filesystem):
#   HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh configs/paper-llama-3.1-70b.yaml --output-dir /shared/runs/70b
# Environment: HOSTFILE (none: this machine only), NUM_GPUS (per node; default all), MASTER_ADDR,
# MASTER_PORT (29500), DS_CONFIG (configs/deepspeed/zero3.json; zero3_offload.json offloads to CPU),
# DS_ENV_VARS (more variable names to forward to the other hosts), DRY_RUN=1 (print the command, run nothing).
# The backend and DeepSpeed JSON are set here; later --set arguments override them.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
CONFIG=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DS_CONFIG=${DS_CONFIG:-$HERE/../configs/deepspeed/zero3.json}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/hfdist/torch_extensions}

args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")

if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  # DeepSpeed's multi-node runner (pdsh/ssh) starts the remote ranks with a fresh login environment plus the
  # variables whose names begin with PYTHON, NCCL, UCX, MV2, MLFLOW, and the NAME=value lines of a
  # `.deepspeed_env` file (in $HOME or the current folder; DS_ENV_FILE names another). Write one that also carries
  # what hfdist's ranks read: the Hugging Face caches and offline switches, hfdist's own cache, the JIT-op cache,
  # threads, the CUDA toolkit, PyTorch's NCCL watchdog settings, and the virtual environment. A user's own
  # ~/.deepspeed_env or ./.deepspeed_env comes first. Secrets (HF_TOKEN) are left out: log in on every host.
  FORWARD=(PATH LD_LIBRARY_PATH VIRTUAL_ENV HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE HF_HUB_OFFLINE HF_DATASETS_OFFLINE
           TRANSFORMERS_OFFLINE HFDIST_HOME TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR OMP_NUM_THREADS CUDA_HOME
           TOKENIZERS_PARALLELISM ${DS_ENV_VARS:-})
  ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/hfdist-deepspeed-env.XXXXXX")
  for existing in "$HOME/.deepspeed_env" ./.deepspeed_env; do
    [[ -f "$existing" ]] && grep '=' "$existing" >> "$ENV_FILE" || true
  done
  for name in "${FORWARD[@]}"; do
    [[ -n "${!name:-}" ]] && printf '%s=%s\n' "$name" "${!name}" >> "$ENV_FILE"
  done
  while IFS='=' read -r name value; do
    [[ "$name" == TORCH_NCCL_* || "$name" == TORCH_DIST* ]] && printf '%s=%s\n' "$name" "$value" >> "$ENV_FILE"
  done < <(env)
  export DS_ENV_FILE=$ENV_FILE  # an absolute path: DeepSpeed's runner reads this file instead of .deepspeed_env
fi

cmd=(deepspeed "${args[@]}" --module hfdist.cli hyperfit "$CONFIG"
     --set distributed.backend=deepspeed --set "distributed.deepspeed_config=$DS_CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  [[ -n "${DS_ENV_FILE:-}" && -n "${HOSTFILE:-}" ]] && { echo "DS_ENV_FILE=$DS_ENV_FILE"; cat "$DS_ENV_FILE"; }
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
