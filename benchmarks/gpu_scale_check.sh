#!/usr/bin/env bash
# The GPU scale check (a few minutes on one GPU): a world-size-1 NCCL job of FSDP2 with CPU offload,
# bf16 mixed precision and clipping (the process group must be cuda:nccl,cpu:gloo: the clipping norm of host-resident
# gradients), an asynchronous checkpoint, a resume, and the streaming export loaded back by from_pretrained.
# Usage: benchmarks/gpu_scale_check.sh OUT_DIR      (the log is OUT_DIR/gpu_scale_check.log)
set -euo pipefail
OUT=${1:?usage: gpu_scale_check.sh OUT_DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_scale_check.log") 2>&1
"$PYTHON" -c "from hfdist.testing import tiny_model_folder; tiny_model_folder('$OUT/tiny', hidden_size=256, num_layers=4)"
cat > "$OUT/config.yaml" <<YAML
model: {path: $OUT/tiny}
data: {source: austen, mode: chunk, seq_len: 64, num_samples: 32, num_validation: 8, num_contexts: 2, context_len: 8}
optim: {name: adam, lr: 1.0e-3, max_grad_norm: 0.5}
train: {epochs: 2, global_batch_size: 8, micro_batch_size: 4}
eval: {every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}
checkpoint: {every_steps: 2, keep_last: 2, async: true}
distributed: {backend: fsdp, mixed_precision: true, cpu_offload: true}
export: {dtype: bfloat16}
YAML
GPUS_PER_NODE=1 PYTHON="$PYTHON" "$HERE/launchers/torchrun.sh" "$OUT/config.yaml" --output-dir "$OUT/run" --no-progress \
  2>&1 | tee "$OUT/first_run.log"
grep -q "process group: cuda:nccl,cpu:gloo" "$OUT/first_run.log" || { echo "no CPU backend beside NCCL"; exit 1; }
rm -rf "$OUT/run/model"
GPUS_PER_NODE=1 PYTHON="$PYTHON" "$HERE/launchers/torchrun.sh" "$OUT/config.yaml" --output-dir "$OUT/run" --no-progress \
  --resume "$OUT/run/checkpoints/step_00000004"
"$PYTHON" - "$OUT/run/model" <<'PY'
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
print("export:", model.dtype, sum(p.numel() for p in model.parameters()), "parameters;",
      json.load(open(f"{sys.argv[1]}/model.safetensors.index.json"))["metadata"])
assert model.dtype == torch.bfloat16
PY
echo "gpu_scale_check: OK"
