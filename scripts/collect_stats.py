"""Precompute and cache the second-moment statistics C0 of every edited layer of an hparams file.

Every layer's statistics come from one pass over the sample. Under torchrun (WORLD_SIZE > 1) the ranks
share the texts and all-reduce their sums (gloo on CPU, nccl on CUDA, one GPU per rank); rank 0 writes.

Example (offline, embedded model, local WikiText-2):
  python scripts/collect_stats.py --model_name smollm2-135m --hparams hparams/MEMIT/smollm2-135m.json \\
      --corpus ../shared/data/wikitext-2
  torchrun --nproc_per_node 2 scripts/collect_stats.py ...   # the same, on two processes
"""
import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from algs.stats_accumulate import ACCUMULATE_DTYPES, DEFAULT_BATCH_TOKENS

from algs.second_moment import FORWARD_DTYPES, layer_second_moments

from algs.stats_corpus import check_corpus
from util.arch import module_names, num_layers
from util.checks import check_device
from util.errors import InputError, report
from util.io import read_json
from util.models import load_model, model_identity

PROG = "collect_stats"
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
    parser.add_argument("--device", default="cpu", help="torch device for the forward passes (default: cpu; "
                        "under torchrun 'cuda' means each rank's own GPU, LOCAL_RANK)")
    parser.add_argument("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help="padded tokens per forward pass (default %(default)s; halved by itself on out-of-memory)")
    parser.add_argument("--accumulate_dtype", default="float64", choices=sorted(ACCUMULATE_DTYPES),
                        help="dtype of each batch's k kᵀ, added into float64 totals (default float64; float32 is "
                             "faster on GPUs with slow float64)")
    parser.add_argument("--published_stats_dir", type=Path,
                        help="read the ROME/MEMIT repos' precomputed .npz statistics from this folder (their "
                             "stats_dir: <model>/<ds>_stats/<layer module>_<dtype>_mom2_<n>.npz) or one such file, "
                             "instead of computing; cached in --stats_dir")
    return parser.parse_args(argv)


def read_hparams_file(path: Path) -> dict:
    """The file's JSON object; an error naming the file when it is absent, not JSON or not an object."""
    try:
        hparams = read_json(path)
    except FileNotFoundError:
        raise InputError("file not found", str(path), "pass an existing hparams JSON file to --hparams") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"invalid JSON ({error})", str(path), "fix the file (an hparams JSON object)") from None
    if not isinstance(hparams, dict):
        raise InputError(f"a JSON {type(hparams).__name__} instead of an object", str(path),
                         "give an hparams JSON object")
    return hparams


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_statistics_keys(hparams: dict, where: str) -> None:
    """The keys collect_stats reads, in type and range (a string "24" would be read as layers 2 and 4)."""
    layers, multiplier = hparams["layers"], hparams.get("dynamic_multiplier", 1)
    checks = (
        ("layers", isinstance(layers, list) and layers and all(is_int(x) and x >= 0 for x in layers),
         "a non-empty list of layer numbers, e.g. [17]"),
        ("mom2_n_samples", is_int(hparams["mom2_n_samples"]) and hparams["mom2_n_samples"] > 0, "a positive integer"),
        ("mom2_dtype", hparams["mom2_dtype"] in FORWARD_DTYPES, f"one of {sorted(FORWARD_DTYPES)}"),
        ("mom2_dataset", isinstance(hparams["mom2_dataset"], str) and hparams["mom2_dataset"].strip(),
         "'wikipedia', 'wikitext-103' or a local text path"),
        ("dynamic", isinstance(hparams.get("dynamic", False), bool), "true or false"),
        ("dynamic_multiplier", isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool)
         and math.isfinite(multiplier) and multiplier > 0, "a positive number"),
        ("mom2_max_length", hparams.get("mom2_max_length") is None or (is_int(hparams["mom2_max_length"])
                                                                      and hparams["mom2_max_length"] > 0),
         "a positive number of tokens, or null (the model's maximum positions)"),
        ("rewrite_module_tmp", isinstance(hparams.get("rewrite_module_tmp", ""), (str, type(None))),
         "a module name template such as 'transformer.h.{}.mlp.c_proj'"),
    )
    for key, ok, fix in checks:
        if not ok:
            raise InputError(f"key {key!r} is {hparams.get(key)!r}", where, f"give {fix}")


def read_hparams(path: Path) -> dict:
    hparams = read_hparams_file(path)
    missing = [key for key in REQUIRED_KEYS if key not in hparams]
    if hparams.get("dynamic", False) is True and "dynamic_multiplier" not in hparams:
        missing.append("dynamic_multiplier")
    if missing:
        raise InputError(f"missing key(s) {missing}", str(path), "add them (see --help for what is read)")
    check_statistics_keys(hparams, str(path))
    return hparams


def main(argv=None) -> int:
    """Exit status: 0, or 2 with one line on stderr for bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        collect(args)
    except (ValueError, RuntimeError, OSError) as error:  # bad input: a message, not a traceback
        return report(PROG, error)
    return 0


def collect(args):
    hparams = read_hparams(args.hparams)
    if args.layers and min(args.layers) < 0:
        raise InputError(f"layers {args.layers}", "--layers", "give layer numbers from 0")
    if args.batch_tokens < 1:
        raise InputError(f"batch_tokens {args.batch_tokens}", "--batch_tokens", "give a positive number of tokens")
    check_device(args.device)
    if args.published_stats_dir is None:
        check_corpus(args.corpus or hparams["mom2_dataset"])
    elif not args.published_stats_dir.exists():
        raise InputError("no such file or folder", f"--published_stats_dir {args.published_stats_dir}",
                         "give the reference repos' stats folder or one .npz of it")
    distributed, device = join_process_group(args.device)
    try:
        collect_moments(args, hparams, distributed, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def join_process_group(device: str) -> tuple[bool, str]:
    """(distributed, device) of this process: under torchrun (WORLD_SIZE > 1) join the process group, nccl with
    one GPU per rank on CUDA, gloo on CPU; else (False, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True, device


def collect_moments(args, hparams: dict, distributed: bool, device: str) -> None:
    model, tok = load_model(args.model_name, device=device, dtype=hparams["mom2_dtype"])
    layers = args.layers or hparams["layers"]
    if max(layers) >= num_layers(model):
        raise InputError(f"layers {layers} do not fit {args.model_name}", f"{args.hparams} / --layers",
                         f"give layers below {num_layers(model)} (hparams of another model?)")
    names = module_names(model, {"rewrite_module_tmp": hparams.get("rewrite_module_tmp")})
    model_id, revision = model_identity(model)
    modules = {layer: names.rewrite_module_tmp.format(layer) for layer in layers}
    moments = layer_second_moments(
        model, tok, list(modules.values()),
        corpus=args.corpus or hparams["mom2_dataset"],
        dynamic=hparams.get("dynamic", False),
        dynamic_multiplier=hparams.get("dynamic_multiplier", 0),
        n_samples=hparams["mom2_n_samples"], max_length=hparams.get("mom2_max_length"),
        model_id=model_id, model_revision=revision,
        stats_dir=args.stats_dir, dtype=hparams["mom2_dtype"], device=device, batch_tokens=args.batch_tokens,
        accumulate_dtype=args.accumulate_dtype, distributed=distributed,
        published_stats_dir=args.published_stats_dir,
    )
    if distributed and dist.get_rank() != 0:
        return
    for layer, module in modules.items():
        stats = moments[module]
        print(f"layer {layer}: {stats.cache}; {stats.n_tokens} tokens of {stats.n_texts} texts from "
              f"{stats.corpus} -> {stats.cache_path}")


if __name__ == "__main__":
    sys.exit(main())
