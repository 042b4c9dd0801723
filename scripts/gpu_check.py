"""The checks a GPU machine is for, in minutes on one GPU (issue: big models), printed as tables:

  1. edits in float16 and bfloat16 with every algorithm on the embedded model: time, ES before/after, weight dtype;
  2. C0 for MEMIT's layers with dynamic_multiplier 10 (one pass, cold cache): time;
  3. a batch of --big_batch EMMET and MEMIT edits (float32): time per edit, ES/PS/NS after.

Run it through scripts/gpu_check.sh (which adds the benchmark). On a CPU, `--device cpu --big_batch 4` checks the
script itself in a few minutes.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from algs import PACKAGES, Editor
from algs.distribute import orig_weights, second_moments_for
from dsets import load_records
from experiments.metrics import evaluate, format_table, mean_scores
from util.arch import module_names
from util.globals import REPO_ROOT
from util.models import EMBEDDED_ALIAS, load_model

SHARED = REPO_ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device (default cuda)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], help="section 1 dtypes")
    parser.add_argument("--small_batch", type=int, default=4, help="section 1: edits per algorithm (default 4)")
    parser.add_argument("--big_batch", type=int, default=256, help="section 3: edits in one batch (default 256)")
    parser.add_argument("--data_dir", default=str(SHARED), help="data dir with CounterFact (default ../shared/data)")
    parser.add_argument("--corpus", default=str(SHARED / "wikitext-2"), help="statistics corpus (local WikiText-2)")
    return parser.parse_args(argv)


def table(title, header, rows):
    print(f"\n== {title}\n" + format_table(header, rows))
    sys.stdout.flush()


def percent_scores(model, tok, records) -> dict:
    means = mean_scores([case["scores"] for case in evaluate(model, tok, records, "cf")])
    return {name: 100 * means[name] for name in ("ES", "PS", "NS")}


def edit(alg, model, tok, records, stats_dir, corpus, **overrides):
    """(seconds, scores before, scores after, weight dtype) of one edit of `records`; the weights are restored."""
    editor = Editor(model, tok, alg, f"{EMBEDDED_ALIAS}.json", stats_dir=stats_dir)
    editor.hparams.mom2_dataset = corpus
    for key, value in overrides.items():
        setattr(editor.hparams, key, value)
    before = percent_scores(model, tok, records)
    editor.prepare()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with editor.edited(records):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        after = percent_scores(model, tok, records)
        dtype = str(next(iter(orig_weights(model, editor.hparams).values())).dtype).removeprefix("torch.")
    return seconds, before, after, dtype


def main(argv=None):
    args = parse_args(argv)
    print(f"gpu_check: torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""))
    records = list(load_records("cf", args.data_dir, max(args.big_batch, args.small_batch)))
    stats_dir = tempfile.mkdtemp(prefix="gpu_check_stats_")
    rows = []
    for dtype in args.dtypes:
        model, tok = load_model(EMBEDDED_ALIAS, device=args.device, dtype=dtype)
        for alg in PACKAGES:
            seconds, before, after, weight_dtype = edit(alg, model, tok, records[:args.small_batch], stats_dir,
                                                        args.corpus, mom2_dtype=dtype)
            rows.append([dtype, alg, str(args.small_batch), seconds, before["ES"], after["ES"], weight_dtype])
        del model
    table(f"1. edits on {args.device}", ["dtype", "alg", "edits", "seconds", "ES before", "ES after", "weights"], rows)

    model, tok = load_model(EMBEDDED_ALIAS, device=args.device)
    hp = Editor(model, tok, "MEMIT", f"{EMBEDDED_ALIAS}.json").hparams
    hp.mom2_dataset = args.corpus
    modules = [module_names(model).rewrite_module_tmp.format(layer) for layer in hp.layers]
    started = time.perf_counter()
    moments = second_moments_for(model, tok, hp, modules, tempfile.mkdtemp(prefix="gpu_check_cold_"))
    table("2. statistics (one pass, cold cache)", ["layers", "tokens per layer", "multiplier", "seconds"],
          [[str(hp.layers), str(next(iter(moments.values())).n_tokens), str(hp.dynamic_multiplier),
            time.perf_counter() - started]])

    rows = []
    for alg in ("EMMET", "MEMIT"):
        seconds, before, after, _ = edit(alg, model, tok, records[:args.big_batch], stats_dir, args.corpus)
        rows.append([alg, str(args.big_batch), seconds, seconds / args.big_batch,
                     *(f"{before[m]:.1f}->{after[m]:.1f}" for m in ("ES", "PS", "NS"))])
    table(f"3. one batch of {args.big_batch} edits (float32)", ["alg", "edits", "seconds", "s/edit", "ES", "PS", "NS"],
          rows)


if __name__ == "__main__":
    main()
