"""Small hparams sweep on real CounterFact cases: edit layer(s) and λ, one batch per configuration.

Prints ES / PS / NS / S (post-edit, %) for each configuration, with the unedited model's figures first.
Target vectors are cached on disk, so configurations sharing a target layer and clamp reuse them.

    python scripts/sweep_hparams.py --model_name smollm2-135m --alg EMMET --layers 2 4 6 8 --n_cases 10 \\
        --data_dir ../shared/data --stats_corpus ../shared/data/wikitext-2
"""
import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algs import Editor
from dsets import load_records
from experiments.metrics import evaluate, mean_scores
from util import globals as G
from util.models import load_model


def percent_scores(model, tok, records) -> dict:
    """ES / PS / NS / S over the records, in %."""
    means = mean_scores([case["scores"] for case in evaluate(model, tok, records, "cf")])
    return {name: 100 * means[name] for name in ("ES", "PS", "NS", "S")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2-135m", help="hub id, local directory or smollm2-135m")
    parser.add_argument("--alg", default="EMMET", choices=["ROME", "MEMIT", "EMMET"], help="algorithm to sweep")
    parser.add_argument("--hparams", required=True, help="base hparams JSON; swept keys are overridden")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="edit layer configurations: '5' for one layer, '3-7' for a MEMIT spread")
    parser.add_argument("--lambdas", nargs="*", type=float, default=[],
                        help="mom2_update_weight values to try (default: the base file's)")
    parser.add_argument("--n_cases", type=int, default=10, help="CounterFact cases (one batch)")
    parser.add_argument("--data_dir", default=None, help="data directory holding CounterFact")
    parser.add_argument("--stats_corpus", default=None, help="override mom2_dataset (e.g. a local WikiText path)")
    parser.add_argument("--stats_dir", default=None, help="second-moment cache (default: globals.yml STATS_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the context templates")
    parser.add_argument("--target_cache_dir", default=None,
                        help="where target vectors are cached (default: a new temporary folder); reuse one to share "
                             "targets between sweeps with the same target layer and optimisation hparams")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    model, tok = load_model(args.model_name)
    records = list(load_records("cf", args.data_dir, args.n_cases))
    base = json.load(open(args.hparams))
    if args.stats_corpus:
        base["mom2_dataset"] = args.stats_corpus
    cache_dir = args.target_cache_dir or tempfile.mkdtemp(prefix="sweep_targets_")
    print(f"target cache: {cache_dir}")

    print(f"{len(records)} cases from {load_records('cf', args.data_dir, 1).source.get('paths')}")
    print(json.dumps({"config": "unedited", **{k: round(v, 1) for k, v in percent_scores(model, tok, records).items()}}))
    for spec in args.layers:
        first, _, last = spec.partition("-")
        layers = list(range(int(first), int(last or first) + 1))
        for lam in args.lambdas or [base.get("mom2_update_weight", 1.0)]:
            editor = Editor(model, tok, args.alg, {**base, "layers": layers, "mom2_update_weight": lam},
                            seed=args.seed, stats_dir=args.stats_dir or G.stats_dir(), target_cache_dir=cache_dir)
            started = time.time()
            with editor.edited(records):
                seconds = time.time() - started
                result = percent_scores(model, tok, records)
            print(json.dumps({"alg": args.alg, "layers": spec, "lambda": lam, "seconds": round(seconds, 1),
                              **{k: round(v, 1) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
