#!/usr/bin/env bash
# The embedded-model benchmark: 50 CounterFact cases (ROME schema) with ROME, and EMMET and MEMIT at batch
# sizes 1 and 16, then one summary table, CSV and plot. CPU-friendly: MEMIT and EMMET share their target
# vectors through --use_cache (same target layer and optimisation hparams).
#   bash scripts/run_smollm2_cf50.sh [N_CASES]       (env: SHARED_DATA, OUT_DIR, EXTRA_FLAGS)
set -euo pipefail
cd "$(dirname "$0")/.."
N_CASES="${1:-50}"
SHARED_DATA="${SHARED_DATA:-../shared/data}"
OUT_DIR="${OUT_DIR:-results/smollm2_cf${N_CASES}}"
# Only the ROME-schema subset (2 paraphrases, 10 neighborhood prompts per case) in this data dir:
DATA_DIR="$OUT_DIR/data"
mkdir -p "$DATA_DIR"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/counterfact_rome" "$DATA_DIR/counterfact_rome"
COMMON=(--model_name=smollm2-135m --hparams_fname=smollm2-135m.json --ds_name=cf
        --dataset_size_limit="$N_CASES" --data_dir="$DATA_DIR" --results_dir="$OUT_DIR"
        --stats_corpus="$SHARED_DATA/wikitext-2" --generation_test_interval=10 --use_cache ${EXTRA_FLAGS:-})
export KE_NO_DOWNLOAD=1
# Two processes side by side, one thread each: ROME, and the EMMET/MEMIT chain (which shares target vectors).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python experiments/evaluate_unified_editing.py --alg_name=ROME --num_edits=1 "${COMMON[@]}" &
rome=$!
for alg in EMMET MEMIT; do
  for n in 1 16; do
    python experiments/evaluate_unified_editing.py --alg_name="$alg" --num_edits="$n" "${COMMON[@]}"
  done
done
wait "$rome"
python experiments/summarize.py "$OUT_DIR" --csv "$OUT_DIR/summary.csv" --json "$OUT_DIR/summary.json" \
    --plot "$OUT_DIR/summary.png"
