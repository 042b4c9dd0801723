#!/usr/bin/env bash
# The small sequential sweep behind hparams/{ENCORE,AlphaEdit}/smollm2-135m.json: SmolLM2-135M, CounterFact
# (ROME schema) dataset rows FIRST..FIRST+N_EDITS-1 (default 1000..1099, disjoint from the first 500 cases of
# the lifelong experiment), sequential, batches of BATCH; WikiText-2 perplexity before and after; single-thread
# runs, JOBS at once. Grid: ENCORE update_norm_lambda (u) x AlphaEdit (nullspace_threshold, L2); every other
# value from the committed hparams file. Prints one table (summarize) of all runs; choose by retention S,
# perplexity and max ||W - W0||.
#   bash scripts/sweep_lifelong_smollm2.sh       (env: FIRST, N_EDITS, BATCH, JOBS, ENCORE_U, ALPHAEDIT, OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST="${FIRST:-1000}"
N_EDITS="${N_EDITS:-100}"
BATCH="${BATCH:-50}"
JOBS="${JOBS:-2}"
ENCORE_U="${ENCORE_U:-2 10 50}"                       # update_norm_lambda values
ALPHAEDIT="${ALPHAEDIT:-0.02:10 0.005:10 0.02:1}"     # nullspace_threshold:L2 pairs
SHARED_DATA="${SHARED_DATA:-../shared/data}"
OUT_DIR="${OUT_DIR:-results/sweep_smollm2}"
mkdir -p "$OUT_DIR/data/counterfact_rome" "$OUT_DIR/data/wikitext-2-raw" "$OUT_DIR/hparams"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/wikitext-2-raw/wiki.test.raw" "$OUT_DIR/data/wikitext-2-raw/wiki.test.raw"
python - "$SHARED_DATA" "$OUT_DIR" "$FIRST" "$N_EDITS" "$ENCORE_U" "$ALPHAEDIT" <<'EOF'
import glob, json, sys
shared, out, first, n, encore_u, alphaedit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:]
source = sorted(glob.glob(f"{shared}/counterfact_rome/*.json"))[0]
rows = json.load(open(source))[first:first + n]
json.dump(rows, open(f"{out}/data/counterfact_rome/sweep_rows_{first}_{first + n - 1}.json", "w"))
encore = json.load(open("hparams/ENCORE/smollm2-135m.json"))
alpha = json.load(open("hparams/AlphaEdit/smollm2-135m.json"))
for u in encore_u.split():
    json.dump({**encore, "update_norm_lambda": float(u)}, open(f"{out}/hparams/ENCORE_u{u}.json", "w"), indent=1)
for pair in alphaedit.split():
    threshold, l2 = pair.split(":")
    json.dump({**alpha, "nullspace_threshold": float(threshold), "L2": float(l2)},
              open(f"{out}/hparams/AlphaEdit_t{threshold}_L{l2}.json", "w"), indent=1)
print(f"{len(rows)} cases from {source} rows {first}..{first + len(rows) - 1}")
EOF
export KE_NO_DOWNLOAD=1 OMP_NUM_THREADS=1 OUT_DIR N_EDITS BATCH SHARED_DATA
sweep_one() {  # hparams file; the algorithm is the file name up to the first "_"
  local name alg
  name="$(basename "$1" .json)"; alg="${name%%_*}"
  python experiments/evaluate_unified_editing.py --alg_name="$alg" --model_name=smollm2-135m --hparams_fname="$1" \
      --ds_name=cf --dataset_size_limit="$N_EDITS" --num_edits="$BATCH" --sequential --data_dir="$OUT_DIR/data" \
      --results_dir="$OUT_DIR/runs/$name" --stats_corpus="$SHARED_DATA/wikitext-2" --skip_generation_tests \
      --do_downstream_eval --downstream_tasks= --downstream_eval_steps="$N_EDITS" > "$OUT_DIR/$name.log" 2>&1
}
export -f sweep_one
status=0
ls "$OUT_DIR"/hparams/*.json | xargs -P "$JOBS" -I{} bash -c 'sweep_one "$1"' _ {} || status=$?
python experiments/summarize.py "$OUT_DIR"/runs/*/*/run_* --csv "$OUT_DIR/summary.csv"
exit "$status"
