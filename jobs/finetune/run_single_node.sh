#!/usr/bin/env bash
# Full SFT on all GPUs of this node with DeepSpeed ZeRO-3 (the official run_telechat_single_node.sh).
# Usage: run_single_node.sh MODEL_DIR DATA(jsonl|data.json) OUTPUT_DIR [extra flags, e.g. --offload]
# NGPUS overrides the GPU count. torchrun sets OMP_NUM_THREADS=1 per process.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MODEL_DIR DATA OUTPUT_DIR [flags...]" >&2; exit 2; }
model=$1 data=$2 output=$3; shift 3
ngpus=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$ngpus" -ge 1 ] || { echo "no GPU found; set NGPUS" >&2; exit 2; }
cd "$(dirname "$0")/../.."
exec torchrun --standalone --nproc_per_node "$ngpus" -m jobs.finetune --method full --zero 3 \
  --model "$model" --data "$data" --output "$output" \
  --max-seq-len 4096 --batch-size 1 --grad-accum 4 --epochs 1 --lr 3e-5 --weight-decay 1e-4 \
  --scheduler cosine --warmup 0.1 --gradient-checkpointing --save-steps 100 "$@"
