#!/usr/bin/env bash
# Lifelong (sequential) editing on the embedded SmolLM2-135M, CPU-friendly: N_EDITS CounterFact edits (ROME
# schema: 2 paraphrases, 10 neighbourhood prompts per case) in batches of BATCH, one single-thread process per
# algorithm, at most JOBS at once (in the order of ALGS), with the forgetting curve every RETENTION_STEPS edits
# and model health every STEPS edits (TASKS, default sst2, mrpc, cola, rte, mmlu; 4-shot; 100 tests; WikiText-2
# perplexity); then one summary table, CSVs and plot. Run it again to resume: an unfinished run continues where its last
# completed batch left it (--continue_from_run), a finished one is kept.
#   bash scripts/run_lifelong_smollm2.sh [N_EDITS] [BATCH]
#   env: ALGS, JOBS, STEPS, RETENTION_STEPS, TASKS, SHARED_DATA, OUT_DIR, EXTRA_FLAGS
#   e.g. ALGS="ENCORE AlphaEdit MEMIT EMMET" STEPS=100 bash scripts/run_lifelong_smollm2.sh 500 50
set -euo pipefail
cd "$(dirname "$0")/.."
N_EDITS="${1:-200}"
BATCH="${2:-20}"
STEPS="${STEPS:-40}"
RETENTION_STEPS="${RETENTION_STEPS:-$STEPS}"
ALGS="${ALGS:-MEMIT EMMET}"
JOBS="${JOBS:-2}"
TASKS="${TASKS:-sst2,mrpc,cola,rte,mmlu}"
SHARED_DATA="${SHARED_DATA:-../shared/data}"
OUT_DIR="${OUT_DIR:-results/lifelong_smollm2_${N_EDITS}x${BATCH}}"
DATA_DIR="$OUT_DIR/data"  # only the ROME-schema subset, so cf reads it (not the reduced EasyEdit files)
mkdir -p "$DATA_DIR"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/counterfact_rome" "$DATA_DIR/counterfact_rome"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/downstream" "$DATA_DIR/downstream"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/wikitext-2-raw" "$DATA_DIR/wikitext-2-raw"
export KE_NO_DOWNLOAD=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" EXTRA_FLAGS="${EXTRA_FLAGS:-}"

run_status() {  # the status in <OUT_DIR>/<alg>/run_000/params.json, "none" when there is no such run
  python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status", "unknown"))' \
      "$OUT_DIR/$1/run_000/params.json" 2>/dev/null || echo none
}

run_one() {
  local alg="$1" resume=() status
  status="$(run_status "$alg")"
  if [ "$status" = finished ]; then echo "$alg: finished before, kept"; return 0; fi
  if [ "$status" != none ]; then resume=(--continue_from_run=run_000); echo "$alg: continuing run_000 ($status)"; fi
  python experiments/evaluate_unified_editing.py --alg_name="$alg" --model_name=smollm2-135m \
      --hparams_fname=smollm2-135m.json --ds_name=cf --dataset_size_limit="$N_EDITS" --num_edits="$BATCH" \
      --sequential --data_dir="$DATA_DIR" --results_dir="$OUT_DIR" --stats_corpus="$SHARED_DATA/wikitext-2" \
      --skip_generation_tests --retention_eval_steps="$RETENTION_STEPS" --do_downstream_eval \
      --downstream_eval_steps="$STEPS" --downstream_tasks="$TASKS" --number_of_few_shots=4 \
      --number_of_tests=100 "${resume[@]}" ${EXTRA_FLAGS:-} >> "$OUT_DIR/$alg.log" 2>&1
}

export N_EDITS BATCH STEPS RETENTION_STEPS TASKS SHARED_DATA OUT_DIR DATA_DIR EXTRA_FLAGS
export -f run_status run_one
status=0
printf '%s\n' $ALGS | xargs -P "$JOBS" -I{} bash -c 'run_one "$1"' _ {} || status=$?
python experiments/summarize.py "$OUT_DIR" --csv "$OUT_DIR/summary.csv" --json "$OUT_DIR/summary.json" \
    --plot "$OUT_DIR/summary.png"
exit "$status"
