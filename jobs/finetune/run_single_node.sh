#!/usr/bin/env bash
# Full SFT on all GPUs of this node with DeepSpeed ZeRO-3 (the official run_telechat_single_node.sh).
# Usage: run_single_node.sh MODEL_DIR DATA(jsonl|data.json) OUTPUT_DIR [extra flags, e.g. --offload]
# Paths are relative to where you run it. NGPUS overrides the GPU count (default: nvidia-smi -L).
# torchrun sets OMP_NUM_THREADS=1 per process.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MODEL_DIR DATA OUTPUT_DIR [flags...]" >&2; exit 2; }
model=$1 data=$2 output=$3; shift 3
if [ -z "${NGPUS:-}" ]; then
  command -v nvidia-smi >/dev/null || { echo "$0: nvidia-smi not found, so no NVIDIA GPU to count; set NGPUS=N (processes to start)" >&2; exit 2; }
  NGPUS=$(nvidia-smi -L | wc -l)
fi
[ "$NGPUS" -ge 1 ] || { echo "$0: no GPU found by nvidia-smi; set NGPUS=N (processes to start)" >&2; exit 2; }
# Find the jobs package without leaving the caller's directory (relative paths stay valid).
export PYTHONPATH="$(cd "$(dirname "$0")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec torchrun --standalone --nproc_per_node "$NGPUS" -m jobs.finetune --method full --zero 3 \
  --model "$model" --data "$data" --output "$output" \
  --max-seq-len 4096 --batch-size 1 --grad-accum 4 --epochs 1 --lr 3e-5 --weight-decay 1e-4 \
  --scheduler cosine --warmup 0.1 --gradient-checkpointing --save-steps 100 "$@"
