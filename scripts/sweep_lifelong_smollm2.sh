#!/usr/bin/env bash
# The sequential sweeps behind hparams/{ENCORE,AlphaEdit}/smollm2-135m.json: SmolLM2-135M, CounterFact (ROME
# schema) dataset rows FIRST..FIRST+N_EDITS-1 (default 1000..1099, disjoint from the first 1,000 cases of the
# lifelong experiment), sequential, batches of BATCH; WikiText-2 perplexity before and after; single-thread runs,
# JOBS at once. GRID lists the runs, each ALG or ALG:key=value,key=value (the committed
# hparams/<ALG>/smollm2-135m.json with those keys changed); a run that finished before is kept. Prints one table
# (summarize) of all runs; choose by retention ES/PS/NS, perplexity and max ||W - W0||.
#   bash scripts/sweep_lifelong_smollm2.sh       (env: GRID, FIRST, N_EDITS, BATCH, JOBS, OUT_DIR)
#   e.g. GRID="MEMIT ENCORE ENCORE:prob_cutoff=-4 ENCORE:prob_cutoff=0.9,v_lr=1.0" bash scripts/sweep_lifelong_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST="${FIRST:-1000}"
N_EDITS="${N_EDITS:-100}"
BATCH="${BATCH:-50}"
JOBS="${JOBS:-2}"
GRID="${GRID:-MEMIT ENCORE ENCORE:prob_cutoff=-4 ENCORE:prob_cutoff=-6 ENCORE:prob_cutoff=0.5 ENCORE:prob_cutoff=0.9 ENCORE:v_lr=1.0 ENCORE:v_lr=0.25}"
SHARED_DATA="${SHARED_DATA:-../shared/data}"
OUT_DIR="${OUT_DIR:-results/sweep_smollm2}"
mkdir -p "$OUT_DIR/data/counterfact_rome" "$OUT_DIR/data/wikitext-2-raw" "$OUT_DIR/hparams"
ln -sfn "$(cd "$SHARED_DATA" && pwd)/wikitext-2-raw/wiki.test.raw" "$OUT_DIR/data/wikitext-2-raw/wiki.test.raw"
python - "$SHARED_DATA" "$OUT_DIR" "$FIRST" "$N_EDITS" "$GRID" <<'EOF'
import glob, json, sys
shared, out, first, n, grid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
source = sorted(glob.glob(f"{shared}/counterfact_rome/*.json"))[0]
rows = json.load(open(source))[first:first + n]
json.dump(rows, open(f"{out}/data/counterfact_rome/sweep_rows_{first}_{first + n - 1}.json", "w"))
for entry in grid.split():
    alg, _, changes = entry.partition(":")
    hparams = json.load(open(f"hparams/{alg}/smollm2-135m.json"))
    for change in filter(None, changes.split(",")):
        key, value = change.split("=")  # the CLI refuses a key the algorithm does not have
        hparams[key] = json.loads(value)
    name = "_".join([alg] + [c.replace("=", "") for c in filter(None, changes.split(","))])
    json.dump(hparams, open(f"{out}/hparams/{name}.json", "w"), indent=1)
print(f"{len(rows)} cases from {source} rows {first}..{first + len(rows) - 1}")
EOF
export KE_NO_DOWNLOAD=1 OMP_NUM_THREADS=1 OUT_DIR N_EDITS BATCH SHARED_DATA
sweep_one() {  # hparams file; the algorithm is the file name up to the first "_"
  local name alg status
  name="$(basename "$1" .json)"; alg="${name%%_*}"
  status="$(python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status"))' \
      "$OUT_DIR/runs/$name/$alg/run_000/params.json" 2>/dev/null || echo none)"
  if [ "$status" = finished ]; then echo "$name: finished before, kept"; return 0; fi
  rm -rf "$OUT_DIR/runs/$name"
  python experiments/evaluate_unified_editing.py --alg_name="$alg" --model_name=smollm2-135m --hparams_fname="$1" \
      --ds_name=cf --dataset_size_limit="$N_EDITS" --num_edits="$BATCH" --sequential --data_dir="$OUT_DIR/data" \
      --results_dir="$OUT_DIR/runs/$name" --stats_corpus="$SHARED_DATA/wikitext-2" --skip_generation_tests \
      --do_downstream_eval --downstream_tasks= --downstream_eval_steps="$N_EDITS" > "$OUT_DIR/$name.log" 2>&1
}
export -f sweep_one
status=0
for entry in $GRID; do
  alg="${entry%%:*}"; changes="${entry#"$alg"}"; changes="${changes#:}"
  name="$(printf '%s' "$alg${changes:+_$changes}" | tr ',' '_' | tr -d '=')"
  echo "$OUT_DIR/hparams/$name.json"
done | xargs -P "$JOBS" -I{} bash -c 'sweep_one "$1"' _ {} || status=$?
python experiments/summarize.py "$OUT_DIR"/runs/*/*/run_* --csv "$OUT_DIR/summary.csv"
exit "$status"
