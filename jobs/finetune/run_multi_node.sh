#!/usr/bin/env bash
# Full SFT over several nodes with the DeepSpeed launcher and a hostfile (the official
# run_telechat_multi_node.sh). Run it on the first node; every node needs this repo, the model and
# the data at the same paths and passwordless ssh between nodes.
# Usage: HOSTFILE=hostfile run_multi_node.sh MODEL_DIR DATA OUTPUT_DIR [extra flags...]
# Paths are relative to where you run it (the launcher starts every node in this directory).
# Hostfile lines: "node1 slots=8" (see hostfile.example). MASTER_PORT overrides 29500.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: HOSTFILE=hostfile $0 MODEL_DIR DATA OUTPUT_DIR [flags...]" >&2; exit 2; }
model=$1 data=$2 output=$3; shift 3
hostfile=${HOSTFILE:-hostfile}
[ -f "$hostfile" ] || { echo "hostfile $hostfile not found (see jobs/finetune/hostfile.example)" >&2; exit 2; }
# Find the jobs package without leaving the caller's directory; the launcher passes PYTHON* variables on.
export PYTHONPATH="$(cd "$(dirname "$0")/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --module jobs.finetune \
  --method full --zero 3 --model "$model" --data "$data" --output "$output" \
  --max-seq-len 8192 --batch-size 1 --grad-accum 4 --epochs 1 --lr 3e-5 --weight-decay 1e-4 \
  --scheduler cosine --warmup 0.1 --gradient-checkpointing --save-steps 100 "$@"
