#!/usr/bin/env bash
# Long-context reproduction at small scale (issue 9 §3): train a small TeleChat from scratch at a
# short training length, then measure perplexity at 1x..16x that length in the three RoPE modes.
# Expected: `none` blows up past the training length, `ntk+scaling` stays near the in-length value.
#
#   bench/long_context_repro.sh SFT_DATA_DIR TOKENIZER_DIR [OUT_DIR]
#
# SFT_DATA_DIR holds single_turn_example.jsonl and multi_turn_example.jsonl (../shared/telechat-ref/
# sft-data), TOKENIZER_DIR a TeleChat tokenizer (../shared/telechat-ref/tokenizer-12b). The last
# EVAL_CONVERSATIONS multi-turn conversations are held out as the eval text; perplexity is also measured
# on the training text. Results: OUT_DIR/table.md, ppl_eval.json, ppl_train.json. Target: < 8 min on one H100.
#
# Knobs (environment): SEQ (256) training length; STEPS (600); BATCH (32); LR (1e-3);
# HIDDEN/LAYERS/HEADS/FFN (512/8/8/1408); WINDOWS (4) eval windows per length;
# TRAINER=finetune|fallback (default: finetune when `telechat finetune` is installed, else the
# bench-only loop in bench/long_context.py); PYTHON (python); COMMIT (git commit for the record,
# where the tree has no .git).
#
# training_seqlen = base_seqlen = SEQ: the model learns plain RoPE (alpha 1, mscale 1) at SEQ, so the
# three modes coincide at 1x, and beyond it alpha steps 3, 7, 15, 31 at 2x..16x, as the released 7B
# does past its 4096 base length.
set -euo pipefail

DATA=${1:?usage: bench/long_context_repro.sh SFT_DATA_DIR TOKENIZER_DIR [OUT_DIR]}
TOKENIZER=${2:?usage: bench/long_context_repro.sh SFT_DATA_DIR TOKENIZER_DIR [OUT_DIR]}
OUT=${3:-runs/long_context}
PY=${PYTHON:-python}
SEQ=${SEQ:-256}
STEPS=${STEPS:-600}
BATCH=${BATCH:-32}
LR=${LR:-1e-3}
HIDDEN=${HIDDEN:-512}
LAYERS=${LAYERS:-8}
HEADS=${HEADS:-8}
FFN=${FFN:-1408}
WINDOWS=${WINDOWS:-4}
EVAL_CONVERSATIONS=${EVAL_CONVERSATIONS:-100}
LENGTHS=$((SEQ)),$((SEQ * 2)),$((SEQ * 4)),$((SEQ * 8)),$((SEQ * 16))
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
for f in single_turn_example.jsonl multi_turn_example.jsonl; do
  [[ -f $DATA/$f ]] || { echo "error: $DATA/$f is missing (copy ../shared/telechat-ref/sft-data)" >&2; exit 2; }
done
mkdir -p "$OUT"
: > "$OUT/table.md"
START=$(date +%s)

# 1. Held-out split: eval = the last conversations of the multi-turn file, train = everything else.
head -n -"$EVAL_CONVERSATIONS" "$DATA/multi_turn_example.jsonl" | cat "$DATA/single_turn_example.jsonl" - > "$OUT/train.jsonl"
tail -n "$EVAL_CONVERSATIONS" "$DATA/multi_turn_example.jsonl" > "$OUT/eval.jsonl"

# 2. The small shape as a config.json for --from-scratch.
"$PY" - "$TOKENIZER" "$OUT/scratch_config.json" <<EOF
import json, math, sys
from telechat.tokenizer import load_tokenizer
vocab = 64 * math.ceil(len(load_tokenizer(sys.argv[1])) / 64)
json.dump(dict(model_type="telechat", architectures=["TelechatForCausalLM"], vocab_size=vocab,
               hidden_size=$HIDDEN, n_layer=$LAYERS, n_head=$HEADS, ffn_hidden_size=$FFN,
               training_seqlen=$SEQ, base_seqlen=$SEQ, seq_length=16 * $SEQ, tie_word_embeddings=True),
          open(sys.argv[2], "w"), indent=2)
EOF

# 3. Train from scratch at SEQ tokens.
TRAINER=${TRAINER:-$("$PY" -c "import jobs.finetune.cli" 2>/dev/null && echo finetune || echo fallback)}
echo "== training with: $TRAINER (seq $SEQ, $STEPS steps x $BATCH rows)"
if [[ $TRAINER == finetune ]]; then
  "$PY" -m telechat.cli finetune --from-scratch "$OUT/scratch_config.json" --tokenizer "$TOKENIZER" \
    --method full --data "$OUT/train.jsonl" --max-seq-len "$SEQ" --output "$OUT/train" --overwrite \
    --max-steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup 0.05 --weight-decay 0.1 \
    --save-steps "$STEPS" --logging-steps 50
else
  "$PY" bench/long_context.py train --data "$OUT/train.jsonl" --tokenizer "$TOKENIZER" --output "$OUT/train/model" \
    --seq-len "$SEQ" --hidden "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" --steps "$STEPS" \
    --batch-size "$BATCH" --lr "$LR"
fi
TRAINED=$(date +%s)

# 4. Perplexity at 1x..16x the training length, all three modes: on the held-out conversations, and on
#    the training text, where the in-length perplexity is low and extrapolation alone is measured.
for split in eval train; do
  echo "== perplexity on $split.jsonl"
  "$PY" -m telechat.cli eval-ppl --model "$OUT/train/model" --tokenizer "$TOKENIZER" --data "$OUT/$split.jsonl" \
    --lengths "$LENGTHS" --modes none,ntk,ntk+scaling --training-seqlen "$SEQ" --base-seqlen "$SEQ" \
    --windows "$WINDOWS" --chunk 1024 --no-progress --output "$OUT/ppl_$split.json" > "$OUT/table_$split.md"
  { echo; echo "Perplexity on $split.jsonl:"; echo; cat "$OUT/table_$split.md"; } | tee -a "$OUT/table.md"
done
END=$(date +%s)

GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
{
  echo
  echo "Long-context reproduction, $(date -u +%F), $GPU, commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "trainer $TRAINER; hidden $HIDDEN, $LAYERS layers, $HEADS heads; training length $SEQ; $STEPS steps x $BATCH rows;"
  echo "eval: $WINDOWS windows per length from the start of eval.jsonl (the last $EVAL_CONVERSATIONS multi-turn"
  echo "conversations, held out) and of train.jsonl."
  echo "time: train $((TRAINED - START)) s, eval $((END - TRAINED)) s."
} | tee -a "$OUT/table.md"
