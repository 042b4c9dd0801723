#!/usr/bin/env bash
# Lifelong (sequential) editing on the embedded SmolLM2-135M, CPU-friendly: N_EDITS CounterFact edits (ROME
# schema: 2 paraphrases, 10 neighbourhood prompts per case) in batches of BATCH, one process per algorithm
# side by side (one thread each), with the forgetting curve and model health (sst2, mrpc, cola, rte, mmlu;
# 4-shot; 100 tests; WikiText-2 perplexity) every STEPS edits; then one summary table, CSVs and plot.
#   bash scripts/run_lifelong_smollm2.sh [N_EDITS] [BATCH]     (env: ALGS, STEPS, SHARED_DATA, OUT_DIR, EXTRA_FLAGS)
set -euo pipefail
cd "$(dirname "$0")/.."
N_EDITS="${1:-200}"
BATCH="${2:-20}"
STEPS="${STEPS:-40}"
ALGS="${ALGS:-MEMIT EMMET}"
SHARED_DATA="${SHARED_DATA:-../shared/data}"
OUT_DIR="${OUT_DIR:-results/lifelong_smollm2_${N_EDITS}x${BATCH}}"
DATA_DIR="$OUT_DIR/data"  # only the ROME-schema subset, so cf reads it (not the reduced EasyEdit files)
mkdir -p "$DATA_DIR"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/counterfact_rome" "$DATA_DIR/counterfact_rome"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/downstream" "$DATA_DIR/downstream"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/wikitext-2-raw" "$DATA_DIR/wikitext-2-raw"
export KE_NO_DOWNLOAD=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
pids=()
for alg in $ALGS; do
  python experiments/evaluate_unified_editing.py --alg_name="$alg" --model_name=smollm2-135m \
      --hparams_fname=smollm2-135m.json --ds_name=cf --dataset_size_limit="$N_EDITS" --num_edits="$BATCH" \
      --sequential --data_dir="$DATA_DIR" --results_dir="$OUT_DIR" --stats_corpus="$SHARED_DATA/wikitext-2" \
      --skip_generation_tests --retention_eval_steps="$STEPS" --do_downstream_eval \
      --downstream_eval_steps="$STEPS" --downstream_tasks=sst2,mrpc,cola,rte,mmlu --number_of_few_shots=4 \
      --number_of_tests=100 ${EXTRA_FLAGS:-} > "$OUT_DIR/$alg.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
python experiments/summarize.py "$OUT_DIR" --csv "$OUT_DIR/summary.csv" --json "$OUT_DIR/summary.json" \
    --plot "$OUT_DIR/summary.png"
