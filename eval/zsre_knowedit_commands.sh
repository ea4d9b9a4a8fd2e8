#!/usr/bin/env bash
# Issue 32, item 5: the measured zsRE / KnowEdit report on SmolLM2-135M (in part run here: the README's first table
# says which rows are measured; all of it is about 22 CPU-hours single-edit + 8 sequential, 16.5 more with Fluency:
# eval/reports/zsre_knowedit/README.md).
# Single edits: every registered method and the unedited model on 300 zsRE records and each KnowEdit file's first
# 300; sequential T = 1000 on zsRE for SHIFT_NEURON (lifelong hparams), AlphaEdit and MEMIT (B = 100).
# Resumable: re-running skips finished cases / continues sequential runs from their saved state.
# FLUENCY=0 skips KnowEdit's Fluency (generation, about 3 s per record on the 2-core CPU).
set -euo pipefail
: "${SHIFT_EDIT_DATA:?set SHIFT_EDIT_DATA to the shared data folder}"
OUT=${OUT:-results/zsre_knowedit}
MODEL=${MODEL:-smollm2-135m}
GEN=$([ "${FLUENCY:-1}" = 1 ] && echo "" || echo "--skip-generation")
ALGS=$(python -c "import shift_edit as se; print(' '.join(se.algorithm_names()))")
for data in zsre knowedit-zsre knowedit-recent knowedit-counterfact; do
  shift-edit bench --alg NONE --model "$MODEL" --data "$data" --limit 300 --out "$OUT/$data" --no-progress $GEN
  for alg in $ALGS; do
    shift-edit bench --alg "$alg" --model "$MODEL" --data "$data" --limit 300 --out "$OUT/$data" --no-progress $GEN
  done
done
shift-edit bench --alg SHIFT_NEURON --model "$MODEL" --hparams hparams/SHIFT_NEURON/smollm2-135m-lifelong.yaml \
  --data zsre --out "$OUT/seq" --sequential 1000 --eval-at 10,100,300 --no-progress
for alg in AlphaEdit MEMIT; do
  shift-edit bench --alg "$alg" --model "$MODEL" --data zsre --out "$OUT/seq" --sequential 1000 --batch-edits 100 \
    --eval-at 100,300 --no-progress
done
shift-edit summarize "$OUT"/zsre/*/run_* "$OUT"/knowedit-*/*/run_* "$OUT"/seq/*/seq_* --out eval/reports/zsre_knowedit \
  --reference eval/reference/rome_table1_zsre_gpt2xl.json \
  --reference eval/reference/alphaedit_table1_zsre_sequential.json \
  --reference eval/reference/alphaedit_table2_zsre_sequential.json \
  --reference eval/reference/knowedit_zsre_llama2_7b_chat.json \
  --reference eval/reference/knowedit_recent_llama2_7b_chat.json \
  --reference eval/reference/knowedit_counterfact_llama2_7b_chat.json
