#!/usr/bin/env bash
# Teacher-forced vs generation-based evaluation (SPEC §11) on the embedded SmolLM2-135M, one single-thread process
# per run, JOBS at once; running it again continues unfinished runs and keeps finished ones; then one summary.
#   1. batched (batch BATCH, default 10) on the first N_PORTABILITY (200) CounterFact records with EasyEdit's
#      one-hop portability questions (editing_eval/portability/counterfact_portability_gpt4.json);
#   2. sequential (N_SEQUENTIAL edits, default 100, in batches of SEQ_BATCH, default 20) on KnowEdit
#      WikiData-recent, with the retention of every case edited so far after each batch.
#   bash scripts/run_generation_eval_smollm2.sh
#   env: ALGS, JOBS, N_PORTABILITY, BATCH, N_SEQUENTIAL, SEQ_BATCH, SETTINGS (default "portability knowedit"),
#   EXTRA_FLAGS (added to every run), OUT_DIR; e.g. the questions asked as chat turns (the embedded model is
#   SmolLM2-135M-Instruct):
#   SETTINGS=portability N_PORTABILITY=50 EXTRA_FLAGS=--chat_template OUT_DIR=results/generation_eval_smollm2_chat \
#       bash scripts/run_generation_eval_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ALGS="${ALGS:-EMMET MEMIT AlphaEdit}"
JOBS="${JOBS:-2}"
N_PORTABILITY="${N_PORTABILITY:-200}"
BATCH="${BATCH:-10}"
N_SEQUENTIAL="${N_SEQUENTIAL:-100}"
SEQ_BATCH="${SEQ_BATCH:-20}"
SETTINGS="${SETTINGS:-portability knowedit}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
SHARED_DATA="$(cd "${SHARED_DATA:-../shared/data}" && pwd)"
OUT_DIR="${OUT_DIR:-results/generation_eval_smollm2}"
mkdir -p "$OUT_DIR"
export KE_NO_DOWNLOAD=1 OMP_NUM_THREADS=1 OUT_DIR SHARED_DATA N_PORTABILITY BATCH N_SEQUENTIAL SEQ_BATCH EXTRA_FLAGS

run_one() {  # "<setting> <alg>": setting portability (batched) or knowedit (sequential)
  local setting="${1% *}" alg="${1#* }" results flags status resume=()
  results="$OUT_DIR/$setting"
  if [ "$setting" = portability ]; then
    flags=(--ds_name=cf --dataset_file="$SHARED_DATA/editing_eval/portability/counterfact_portability_gpt4.json"
           --dataset_size_limit="$N_PORTABILITY" --num_edits="$BATCH")
  else
    flags=(--ds_name=knowedit_recent --data_dir="$SHARED_DATA" --dataset_size_limit="$N_SEQUENTIAL"
           --num_edits="$SEQ_BATCH" --sequential --retention_eval_steps="$SEQ_BATCH")
  fi
  status="$(python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status"))' \
      "$results/$alg/run_000/params.json" 2>/dev/null || echo none)"
  if [ "$status" = finished ]; then echo "$setting $alg: finished before, kept"; return 0; fi
  if [ "$status" != none ]; then resume=(--continue_from_run=run_000); fi
  python experiments/evaluate_unified_editing.py --alg_name="$alg" --model_name=smollm2-135m \
      --hparams_fname=smollm2-135m.json "${flags[@]}" --results_dir="$results" \
      --stats_corpus="$SHARED_DATA/wikitext-2" --skip_generation_tests --generation_metrics "${resume[@]}" ${EXTRA_FLAGS} \
      >> "$OUT_DIR/${setting}_$alg.log" 2>&1
}
export -f run_one
status=0
for setting in $SETTINGS; do for alg in $ALGS; do echo "$setting $alg"; done; done |
  xargs -P "$JOBS" -I{} bash -c 'run_one "$1"' _ {} || status=$?
for setting in $SETTINGS; do
  python experiments/summarize.py "$OUT_DIR/$setting" --csv "$OUT_DIR/$setting.csv" --json "$OUT_DIR/$setting.json" \
      --plot "$OUT_DIR/$setting.png" || status=$?
done
exit "$status"
