#!/usr/bin/env bash
# Downloads the wheels the GPU suite (benchmarks/gpu_suite.py) needs and the GPU machine lacks, for its Python
# 3.12 on manylinux x86_64, into .whl/ at the repository root (git-ignored; the device call names it in
# `carry`, and the suite's install step puts them on PYTHONPATH offline). Run it where PyPI is reachable.
#
#   benchmarks/fetch_gpu_wheels.sh                     # liger-kernel: the fused-loss benchmark's Liger rows;
#                                                      #   peft: LoRA (adapter.type: lora; bench_train's
#                                                      #   hfdist-lora rows)
#   benchmarks/fetch_gpu_wheels.sh --with-scale-check  # + datasets, dill, multiprocess (gpu_scale_check.sh loads
#                                                      #   its data through datasets; not a default suite step)
#
# What the machine has (KINDS.md of the device notes: torch 2.11, triton 3.6, transformers 5.17, accelerate,
# safetensors, pyyaml, xxhash, tensorboard, matplotlib, tqdm, numpy, pytest, pytest-xdist, psutil) covers
# hfdist's imports; datasets is imported only when a run loads data (no benchmark does) and gguf only for .gguf
# checkpoints. Versions are the ones hfdist is tested with (setup.py). Liger's only requirements, torch and
# triton, are there; peft (pure Python) needs torch, transformers, accelerate, safetensors, huggingface_hub,
# packaging, psutil, pyyaml, tqdm and numpy, all there. The folder is replaced only once every download succeeded; the total must stay well
# under the 64 MiB a device call carries (the working tree travels too).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MB=32
wheels=(liger-kernel==0.8.5 peft==0.22.0)
case "${1:-}" in
  "") ;;
  --with-scale-check) wheels+=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19) ;;
  *) echo "usage: $0 [--with-scale-check]" >&2; exit 2 ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/hfdist-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${wheels[@]}"

# One file per requested distribution (two versions of one stop the whole install there).
count=$(find "$tmp" -name '*.whl' | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "fetch_gpu_wheels: expected ${#wheels[@]} wheels, got $count:" >&2; ls "$tmp" >&2; exit 1
fi
size_kb=$(du -sk "$tmp" | cut -f1)
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "fetch_gpu_wheels: ${size_kb} KiB is over the ${LIMIT_MB} MiB kept for wheels in a device call" >&2; exit 1
fi
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
ls -l "$DEST"
echo "fetch_gpu_wheels: ${count} wheel(s), $(du -sh "$DEST" | cut -f1) in $DEST (carry: [\"$DEST\"])"
