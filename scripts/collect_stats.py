"""Precompute and cache the second-moment statistics C0 of every edited layer of an hparams file.

Example (offline, embedded model, local WikiText-2):
  python scripts/collect_stats.py --model_name smollm2-135m --hparams hparams/MEMIT/smollm2-135m.json \\
      --corpus ../shared/data/wikitext-2
"""
import argparse
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algs.second_moment import layer_second_moment
from util.arch import module_names
from util.io import read_json
from util.models import load_model, model_identity

REQUIRED_KEYS = ("layers", "mom2_dataset", "mom2_n_samples", "mom2_dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", required=True,
                        help="hub id, local model directory, or 'smollm2-135m' (the embedded model)")
    parser.add_argument("--hparams", required=True, type=Path,
                        help="JSON hparams file; read: layers, mom2_dataset, mom2_n_samples, mom2_dtype (the "
                             "forward dtype: the model is loaded in it), dynamic (default false), "
                             "dynamic_multiplier (when dynamic), rewrite_module_tmp (optional)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="layer numbers to collect instead of the hparams' 'layers'")
    parser.add_argument("--corpus",
                        help="instead of the hparams' mom2_dataset: 'wikipedia', 'wikitext-103' (need the "
                             "`datasets` package and network) or a local text file / directory of .txt/.raw files")
    parser.add_argument("--stats_dir", type=Path,
                        help="cache folder (default: STATS_DIR of globals.yml, env KE_STATS_DIR)")
    parser.add_argument("--device", default="cpu", help="torch device for the forward passes (default: cpu)")
    return parser.parse_args(argv)


def read_hparams(path: Path) -> dict:
    hparams = read_json(path)
    missing = [key for key in REQUIRED_KEYS if key not in hparams]
    if hparams.get("dynamic", False) and "dynamic_multiplier" not in hparams:
        missing.append("dynamic_multiplier")
    if missing:
        raise SystemExit(f"{path}: missing key(s) {missing}")
    if not isinstance(hparams.get("dynamic", False), bool):
        raise SystemExit(f"{path}: 'dynamic' must be true or false, got {hparams['dynamic']!r}")
    return hparams


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        collect(args)
    except (ValueError, RuntimeError, OSError) as error:  # bad input: a message, not a traceback
        raise SystemExit(f"collect_stats: {error}")


def collect(args):
    hparams = read_hparams(args.hparams)
    model, tok = load_model(args.model_name, device=args.device, dtype=hparams["mom2_dtype"])
    names = module_names(model, {"rewrite_module_tmp": hparams.get("rewrite_module_tmp")})
    model_id, revision = model_identity(model)
    for layer in args.layers or hparams["layers"]:
        stats = layer_second_moment(
            model, tok, names.rewrite_module_tmp.format(layer),
            corpus=args.corpus or hparams["mom2_dataset"],
            dynamic=hparams.get("dynamic", False),
            dynamic_multiplier=hparams.get("dynamic_multiplier", 0),
            n_samples=hparams["mom2_n_samples"],
            model_id=model_id, model_revision=revision,
            stats_dir=args.stats_dir, dtype=hparams["mom2_dtype"], device=args.device,
        )
        print(f"layer {layer}: {stats.cache}; {stats.n_tokens} tokens of {stats.n_texts} texts from "
              f"{stats.corpus} -> {stats.cache_path}")


if __name__ == "__main__":
    main()
