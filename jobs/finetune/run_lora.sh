#!/usr/bin/env bash
# LoRA fine-tune on one GPU (the official run_telechat_lora.sh, without its rank bug).
# Usage: run_lora.sh MODEL_DIR DATA(jsonl|data.json) OUTPUT_DIR [extra telechat finetune flags...]
# Paths are relative to where you run it. PYTHON selects the interpreter (default: python on PATH).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MODEL_DIR DATA OUTPUT_DIR [flags...]" >&2; exit 2; }
model=$1 data=$2 output=$3; shift 3
# Find the jobs package without leaving the caller's directory (relative paths stay valid).
export PYTHONPATH="$(cd "$(dirname "$0")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m jobs.finetune --method lora --model "$model" --data "$data" --output "$output" \
  --max-seq-len 4096 --batch-size 1 --grad-accum 4 --epochs 1 --scheduler cosine --warmup 0.1 \
  --lora-rank 8 --lora-alpha 16 --gradient-checkpointing --save-steps 100 "$@"
