"""The command line of evaluate_unified_editing.py: every flag, its checks and the demo's defaults.

Parsing only: nothing here loads a model or touches the results directory. A bad value is a UsageError
(one line, exit status 2) before any work.
"""
import argparse
from pathlib import Path

import torch

from algs import ALGORITHMS
from dsets import DATASETS
from util import globals as G
from util.checks import check_device
from util.errors import UsageError
from util.models import DTYPES, EMBEDDED_ALIAS, parse_device_map

DEMO_DIR = G.REPO_ROOT / "dsets" / "demo"  # the demo's records and statistics text, shipped in the repository
DEFAULT_RUN_ARGV = ["--alg_name=EMMET", f"--model_name={EMBEDDED_ALIAS}", f"--hparams_fname={EMBEDDED_ALIAS}.json",
                    "--ds_name=cf", "--num_edits=2", "--dataset_size_limit=4", "--generation_test_interval=2",
                    f"--dataset_file={DEMO_DIR / 'counterfact_demo.json'}",
                    f"--stats_corpus={DEMO_DIR / 'wikitext2_test_excerpt.txt'}"]
# Flags that change results: a resumed run must have the same values (paths, device and memory use may differ).
# A flag added later counts as its default in a run that predates it (RESULT_ARG_DEFAULTS).
RESULT_ARGS = ("alg_name", "model_name", "ds_name", "num_edits", "sequential", "seed", "dataset_size_limit",
               "dtype", "stats_corpus", "published_stats_dir", "skip_generation_tests", "generation_test_interval",
               "retention_eval_steps", "do_downstream_eval", "downstream_eval_steps", "downstream_tasks",
               "number_of_few_shots", "number_of_tests", "generation_metrics", "chat_template", "dataset_file")
RESULT_ARG_DEFAULTS = {"generation_metrics": False, "chat_template": False, "dataset_file": None}
DEFAULT_DOWNSTREAM_TASKS = "sst2,mrpc,cola,rte,mmlu"
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def parse_bool(text: str) -> bool:
    """True/False/1/0/yes/no, any case (argparse's bool() would read "False" as True)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value
    return parse


positive_int = int_at_least(1, "positive")
non_negative_int = int_at_least(0, "non-negative")


def add_bool(parser, name: str, help_text: str) -> None:
    parser.add_argument(name, type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help=f"{help_text} (`{name}` alone means true; or {name}=true/false/1/0/yes/no; default false)")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_unified_editing.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Summarize a finished run with: python experiments/summarize.py <run_dir>")
    parser.add_argument("--alg_name", required=True, choices=ALGORITHMS,
                        help="editing algorithm: ROME (one fact at a time), MEMIT (batch, least squares), "
                             "EMMET (batch, equality constrained), ENCORE (MEMIT + norm constraint, earlier-edit "
                             "preservation, MPES early stopping), AlphaEdit (MEMIT projected onto C0's null space), "
                             "or ROME/MEMIT with the PRUNE or RECT regulariser on (ROME-PRUNE, MEMIT-PRUNE, ROME-RECT, "
                             "MEMIT-RECT; they read ROME's/MEMIT's hparams files)")
    parser.add_argument("--model_name", required=True,
                        help=f"hub id (e.g. gpt2-xl), a local model directory, or '{EMBEDDED_ALIAS}' (the embedded "
                             "SmolLM2-135M, no download needed)")
    parser.add_argument("--hparams_fname", required=True,
                        help="hparams JSON: a file name looked up in <hparams dir>/<ALG>/ (hparams dir: globals.yml "
                             "HPARAMS_DIR, env KE_HPARAMS_DIR), or a path to a JSON file; unknown keys are errors")
    parser.add_argument("--ds_name", required=True, choices=sorted(DATASETS),
                        help="dataset: " + "; ".join(f"{name} ({spec.description})" for name, spec in DATASETS.items()))
    parser.add_argument("--dataset_file", default=None, metavar="PATH",
                        help="read the dataset from this file instead of looking it up in the data dir by its usual "
                             "names (e.g. a KnowEdit or MQuAKE JSON, or a CounterFact file with portability fields)")
    parser.add_argument("--num_edits", type=positive_int, default=1,
                        help="batch size: how many consecutive records are written into the model by one edit "
                             "(default 1)")
    add_bool(parser, "--sequential",
             "keep every batch's edit, so later batches edit the already edited model; false: restore the "
             "original weights after each batch")
    parser.add_argument("--dataset_size_limit", type=positive_int, default=None,
                        help="use only the first N records of the dataset (default: all)")
    parser.add_argument("--continue_from_run", default=None, metavar="run_XXX",
                        help="go on with an interrupted run in <results_dir>/<ALG>/run_XXX: finished batches are "
                             "kept, the others redone; every flag that changes results must be the same as before")
    add_evaluation_flags(parser)
    add_runtime_flags(parser)
    add_lifelong_flags(parser)
    return parser


def add_evaluation_flags(parser) -> None:
    """What is scored besides the teacher-forced metrics."""
    add_bool(parser, "--generation_metrics",
             "also score what the model says (SPEC §11): greedy answers to every prompt, normalised prefix match "
             "against the target (GES/GPS/GNS, and the G-metric of every portability and locality prompt), in pre, "
             "post, final and retention")
    add_bool(parser, "--chat_template",
             "wrap every evaluation prompt in the tokenizer's chat template (user turn + generation prompt), for "
             "teacher-forced and generated scores alike (an error when the tokenizer has none)")
    add_bool(parser, "--skip_generation_tests", "skip the generation tests (fluency GE, consistency RS)")
    parser.add_argument("--generation_test_interval", type=int, default=1,
                        help="run the generation tests on every N-th case in dataset order (CounterFact only); "
                             "N <= 0 means never (default 1: every case)")


def add_runtime_flags(parser) -> None:
    """Where and how the run goes: devices, precision, folders, statistics."""
    add_bool(parser, "--conserve_memory",
             "save GPU memory: keep the saved original weights, C0, its factors and the float64 solve on the CPU "
             "(default: on the device of each edited matrix)")
    add_bool(parser, "--use_cache",
             "reuse target vectors cached on disk (KV_DIR of globals.yml, env KE_KV_DIR); only in batched mode, "
             "ignored in sequential mode where targets depend on the earlier edits")
    parser.add_argument("--device", default=None,
                        help="torch device for the model (default: cuda if available, else cpu)")
    parser.add_argument("--device_map", default=None, metavar="MAP",
                        help="place the model with Accelerate's big-model loading instead of --device: auto, "
                             "balanced, balanced_low_0, sequential, a JSON object {module: device} or a JSON file of "
                             "one (\"disk\" offloads a module; the edited layers must stay on a GPU or the CPU)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype the model is loaded in (default float32); statistics keys are computed in it "
                             "and accumulated in float64")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the context templates and of the generation tests' sampling (default 0)")
    parser.add_argument("--data_dir", default=None,
                        help="folder with the datasets, snippets and tf-idf files (default: DATA_DIR of globals.yml, "
                             "env KE_DATA_DIR)")
    parser.add_argument("--results_dir", default=None,
                        help="where runs are written as <ALG>/run_XXX (default: RESULTS_DIR of globals.yml, "
                             "env KE_RESULTS_DIR)")
    parser.add_argument("--stats_dir", default=None,
                        help="cache folder of the second-moment statistics C0 (default: STATS_DIR of globals.yml, "
                             "env KE_STATS_DIR)")
    parser.add_argument("--stats_corpus", default=None,
                        help="corpus for the statistics instead of the hparams' mom2_dataset: 'wikipedia', "
                             "'wikitext-103' (need the datasets package and network) or a local text file / folder "
                             "of .txt/.raw files, e.g. ../shared/data/wikitext-2")
    parser.add_argument("--published_stats_dir", default=None,
                        help="read C0 from the ROME/MEMIT/EasyEdit/AlphaEdit .npz second-moment files in this folder "
                             "(<model>/<ds>_stats/<module>_<dtype>_mom2_<n>.npz) or this file instead of computing "
                             "it; the file, its sha256 and count go into params.json")


def add_lifelong_flags(parser) -> None:
    """Sequential (lifelong) runs: retention, model health, saved models."""
    lifelong_flags = parser.add_argument_group(
        "sequential (lifelong) editing", "need --sequential; every case also gets a 'final' score on the model "
        "after the last batch, and weight_norms.jsonl gets one line per batch")
    lifelong_flags.add_argument("--retention_eval_steps", type=non_negative_int, default=0, metavar="N",
                                help="every N edits, re-score every case edited so far (ES/PS/NS) into "
                                     "retention_<edits>edits.json: the forgetting curve (default 0: never)")
    add_bool(lifelong_flags, "--do_downstream_eval",
             "check model health at 0 edits and every --downstream_eval_steps edits: downstream tasks by label "
             "likelihood (accuracy, macro-F1, MCC) and WikiText-2 perplexity, into downstream_<edits>edits.json")
    lifelong_flags.add_argument("--downstream_eval_steps", type=positive_int, default=None, metavar="N",
                                help="edits between health checks (default: only at 0 edits and after the last "
                                     "batch); the last batch is always checked")
    lifelong_flags.add_argument("--downstream_tasks", default=DEFAULT_DOWNSTREAM_TASKS, metavar="T1,T2,...",
                                help="comma-separated tasks of sst2, mrpc, cola, rte, nli (RTE train), mmlu; the "
                                     "reference subsets from <data_dir>/downstream/ (default "
                                     f"{DEFAULT_DOWNSTREAM_TASKS})")
    lifelong_flags.add_argument("--number_of_few_shots", default="4", metavar="K1,K2,...",
                                help="few-shot examples per task: one number for all tasks or one per task "
                                     "(default 4)")
    lifelong_flags.add_argument("--number_of_tests", type=positive_int, default=100, metavar="N",
                                help="test items scored per task (default 100)")
    add_bool(lifelong_flags, "--save_model",
             "save the edited model after the last batch (save_pretrained, safetensors, with the tokenizer and "
             "edits.json) into the run dir as edited_model_<edits>edits/")
    lifelong_flags.add_argument("--model_save_interval", type=non_negative_int, default=0, metavar="N",
                                help="also save the edited model every N edits (default 0: never)")


def parse_args(argv: list, description: str | None = None) -> tuple[argparse.Namespace, bool]:
    """(arguments, whether this is the no-argument demo run)."""
    default_run = not argv
    args = build_parser(description).parse_args(DEFAULT_RUN_ARGV if default_run else argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(args.device)
    args.results_dir = str(Path(args.results_dir or G.results_dir()).expanduser().resolve())
    args.stats_dir = str(Path(args.stats_dir or G.stats_dir()).expanduser().resolve())
    if args.device_map is not None:
        args.device_map = parse_device_map(args.device_map)
    if args.published_stats_dir is not None:
        args.published_stats_dir = str(Path(args.published_stats_dir).expanduser().resolve())
        if not Path(args.published_stats_dir).exists():
            raise UsageError(f"{args.published_stats_dir} does not exist", "--published_stats_dir",
                             "give the folder (or .npz file) of the published statistics")
    if args.dataset_file is not None:
        args.dataset_file = str(Path(args.dataset_file).expanduser().resolve())
        if not Path(args.dataset_file).is_file():
            raise UsageError(f"{args.dataset_file} does not exist", "--dataset_file", "give the dataset's JSON file")
    if args.stats_corpus is not None and Path(args.stats_corpus).expanduser().exists():
        args.stats_corpus = str(Path(args.stats_corpus).expanduser().resolve())
    args.downstream_tasks = [task.strip() for task in args.downstream_tasks.split(",") if task.strip()]
    try:
        few_shots = [int(k) for k in args.number_of_few_shots.split(",")]
    except ValueError:
        raise UsageError(f"--number_of_few_shots: expected integers separated by commas, got "
                         f"{args.number_of_few_shots!r}") from None
    if len(few_shots) == 1:
        few_shots *= len(args.downstream_tasks)
    args.number_of_few_shots = few_shots
    lifelong_options = [flag for flag, used in (
        ("--retention_eval_steps", args.retention_eval_steps), ("--do_downstream_eval", args.do_downstream_eval),
        ("--save_model", args.save_model), ("--model_save_interval", args.model_save_interval)) if used]
    if lifelong_options and not args.sequential:
        raise UsageError(f"{', '.join(lifelong_options)} need --sequential: batched mode restores the original "
                         f"weights after every batch, so there is no edited model to check or save")
    return args, default_run

