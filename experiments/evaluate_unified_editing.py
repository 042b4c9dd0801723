"""Edit a model with ROME, MEMIT or EMMET and evaluate every edited case: the command researchers run.

    python experiments/evaluate_unified_editing.py --alg_name=EMMET --num_edits=4 --model_name=gpt2-xl \\
        --hparams_fname=gpt2-xl.json --ds_name=cf --sequential=True

With no arguments, a small demo runs on the embedded model: EMMET on smollm2-135m, 4 CounterFact cases in
batches of 2, generation tests on every 2nd case.

The records are cut into consecutive batches of --num_edits. For each batch: every case is evaluated on the
current model (pre), the batch is written into the model by one call of the algorithm, every case is
evaluated again (post) and one case_<case_id>.json is written per case. Batched mode then restores the
original weights, so every batch edits the unedited model; sequential mode keeps all edits and saves the
edited matrices after each batch (edited_weights.safetensors), so a killed run goes on from the same model
state with --continue_from_run. Results: <results_dir>/<ALG>/run_XXX/params.json and the case files.

Sequential (lifelong) runs also record, SPEC §8–§9: every case re-scored after the last batch ("final" in its
case file), the forgetting curve (--retention_eval_steps), model health (--do_downstream_eval: downstream
tasks and WikiText-2 perplexity at 0 edits and every --downstream_eval_steps edits), the norms of the edited
matrices after every batch (weight_norms.jsonl), and optionally the edited model (--save_model,
--model_save_interval).
"""
import argparse
import hashlib
import json
import logging
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from algs import ALGORITHMS, get_algorithm
from algs.distribute import load_sequential_state, orig_weights, prepare_unedited, restore_weights, sequential_state
from algs.second_moment import HUB_CORPORA, CorpusUnavailable, check_corpus
from experiments import lifelong
from dsets import DATASETS, AttributeSnippets, DatasetNotFound, get_tfidf_vectorizer, load_records
from experiments.metrics.counterfact import counterfact_metrics_many
from experiments.metrics.generation import GenerationSettings
from experiments.metrics.zsre import zsre_case_metrics
from util import globals as G
from util.checks import check_device, check_hparams_fit
from util.errors import INPUT_ERROR_STATUS, InputError, one_line, report
from util.io import new_run_dir, read_json, remove_temp_leftovers, write_json_atomic, write_tensors_atomic
from util.models import DTYPES, EMBEDDED_ALIAS, load_model, model_identity, parse_device_map

log = logging.getLogger("evaluate_unified_editing")

DEFAULT_RUN_ARGV = ["--alg_name=EMMET", f"--model_name={EMBEDDED_ALIAS}", f"--hparams_fname={EMBEDDED_ALIAS}.json",
                    "--ds_name=cf", "--num_edits=2", "--dataset_size_limit=4", "--generation_test_interval=2"]
SHARED_DATA_DIR = G.REPO_ROOT.parent / "shared" / "data"  # the demo's fallback when the data dir lacks the data
LOCAL_WIKITEXT_DIRS = ("wikitext-2", "wikitext-2-raw")  # the demo's offline statistics corpus
# Flags that change results: a resumed run must have the same values (paths, device and memory use may differ).
RESULT_ARGS = ("alg_name", "model_name", "ds_name", "num_edits", "sequential", "seed", "dataset_size_limit",
               "dtype", "stats_corpus", "published_stats_dir", "skip_generation_tests", "generation_test_interval",
               "retention_eval_steps", "do_downstream_eval", "downstream_eval_steps", "downstream_tasks",
               "number_of_few_shots", "number_of_tests")
RESULT_PARAMS = ("model_id", "model_revision", "dataset_source", "num_cases")
PARAMS_FILE = "params.json"
CHECKPOINT_FILE = "edited_weights.safetensors"
DEFAULT_DOWNSTREAM_TASKS = "sst2,mrpc,cola,rte,mmlu"
PERPLEXITY_CHUNK_TOKENS = 256  # WikiText-2 test chunks of this many tokens (fewer if the model's context is shorter)
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
PROG = "evaluate_unified_editing"
INTERRUPTED_STATUS = 130  # the shell's status for Ctrl-C
FAILED_STATUS = 1  # an unexpected error during the run (not bad input)
STOP_KEYS = ("stopped_at", "error", "error_traceback")  # why the last session stopped; cleared on resume


class UsageError(InputError):
    """Bad input the user can fix; main() prints the message and exits with status 2."""


# ---------------------------------------------------------------- arguments

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_unified_editing.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Summarize a finished run with: python experiments/summarize.py <run_dir>")
    parser.add_argument("--alg_name", required=True, choices=sorted(ALGORITHMS),
                        help="editing algorithm: ROME (one fact at a time), MEMIT (batch, least squares), "
                             "EMMET (batch, equality constrained), ENCORE (MEMIT + norm constraint, earlier-edit "
                             "preservation, MPES early stopping) or AlphaEdit (MEMIT projected onto C0's null space)")
    parser.add_argument("--model_name", required=True,
                        help=f"hub id (e.g. gpt2-xl), a local model directory, or '{EMBEDDED_ALIAS}' (the embedded "
                             "SmolLM2-135M, no download needed)")
    parser.add_argument("--hparams_fname", required=True,
                        help="hparams JSON: a file name looked up in <hparams dir>/<ALG>/ (hparams dir: globals.yml "
                             "HPARAMS_DIR, env KE_HPARAMS_DIR), or a path to a JSON file; unknown keys are errors")
    parser.add_argument("--ds_name", required=True, choices=sorted(DATASETS),
                        help="dataset: cf (CounterFact), mcf (MEMIT's multi-CounterFact) or zsre (zsRE, MEND format)")
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
    add_bool(parser, "--skip_generation_tests", "skip the generation tests (fluency GE, consistency RS)")
    parser.add_argument("--generation_test_interval", type=int, default=1,
                        help="run the generation tests on every N-th case in dataset order (CounterFact only); "
                             "N <= 0 means never (default 1: every case)")
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
    return parser


def parse_args(argv: list) -> tuple[argparse.Namespace, bool]:
    """(arguments, whether this is the no-argument demo run)."""
    default_run = not argv
    args = build_parser().parse_args(DEFAULT_RUN_ARGV if default_run else argv)
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


# ---------------------------------------------------------------- inputs

def hparams_path(alg_name: str, fname: str) -> Path:
    """`fname` itself when it is a file, else <hparams dir>/<ALG>/<fname>."""
    direct = Path(fname).expanduser()
    if direct.is_file():
        return direct.resolve()
    in_dir = G.hparams_dir() / alg_name / fname
    if in_dir.is_file():
        return in_dir.resolve()
    raise UsageError(f"hparams file {fname!r} not found: looked for {direct} and {in_dir}")


def load_dataset(args, default_run: bool):
    """The records and the data dir they came from. The demo falls back to ../shared/data beside the repo."""
    data_dir = Path(args.data_dir or G.data_dir()).expanduser().resolve()
    try:
        return load_records(args.ds_name, data_dir, args.dataset_size_limit), data_dir
    except DatasetNotFound:
        if not (default_run and SHARED_DATA_DIR.is_dir()):
            raise
    log.info("data dir: %s lacks the %s data; using %s", data_dir, args.ds_name, SHARED_DATA_DIR)
    return load_records(args.ds_name, SHARED_DATA_DIR, args.dataset_size_limit), SHARED_DATA_DIR


def demo_stats_corpus(corpus: str, data_dirs: list) -> str:
    """For the demo: a local WikiText copy instead of a hub corpus (which needs `datasets` and network)."""
    if corpus not in HUB_CORPORA:
        return corpus
    for data_dir in data_dirs:
        for name in LOCAL_WIKITEXT_DIRS:
            if (Path(data_dir) / name).is_dir():
                local = str((Path(data_dir) / name).resolve())
                log.info("stats corpus: the demo uses the local %s instead of the hub corpus %r", local, corpus)
                return local
    return corpus


def max_positions(model) -> int:
    """The longest sequence the model takes (perplexity chunks must fit)."""
    config = model.config
    return next((value for name in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(value := getattr(config, name, None), int)), PERPLEXITY_CHUNK_TOKENS)


def check_model_fits(model, hp, path: Path, args) -> None:
    """The hparams' layers exist in this model and v_loss_layer is its last layer (else: hparams of another model)."""
    check_hparams_fit(model, hp, f"{path} (for {args.model_name})")


def generation_plan(args, records, data_dir: Path) -> tuple:
    """(GenerationSettings or None, what params.json records about the generation tests)."""
    if args.ds_name not in ("cf", "mcf"):
        return None, {"run": False, "reason": f"{args.ds_name} has no generation tests"}
    if args.skip_generation_tests:
        return None, {"run": False, "reason": "--skip_generation_tests"}
    if args.generation_test_interval <= 0:
        return None, {"run": False, "reason": f"--generation_test_interval {args.generation_test_interval} <= 0"}
    if not any(record.get("generation_prompts") for record in records):
        return None, {"run": False, "reason": "no record of this dataset copy has generation_prompts"}
    info = {"run": True, "interval": args.generation_test_interval}
    try:
        snippets = AttributeSnippets(data_dir)
        vectorizer = get_tfidf_vectorizer(data_dir)
        info["reference_snippets"] = str(snippets.path)
        settings = GenerationSettings(snippets.by_relation, vectorizer, seed=args.seed)
    except DatasetNotFound as missing:
        info["reference_score_skipped"] = f"{missing.what}: {missing.failure}"
        log.warning("consistency RS will be skipped: %s (fluency GE is still computed)",
                    info["reference_score_skipped"])
        settings = GenerationSettings(seed=args.seed)
    return settings, info


# ---------------------------------------------------------------- params.json

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    import nltk
    import numpy
    import sklearn
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "nltk": nltk.__version__, "sklearn": sklearn.__version__}


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=G.REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def as_json(obj):
    """The value as it reads back from a JSON file (for comparing stored and new params)."""
    return json.loads(json.dumps(obj))


def check_resume(run_dir: Path, stored: dict, now: dict) -> None:
    """Refuse to continue a run whose stored settings differ from this invocation's in any key of `now`."""
    differing = [key for key in now if as_json(stored.get(key)) != as_json(now[key])]
    if differing:
        details = "; ".join(f"{key}: the run has {stored.get(key)!r}, now {now[key]!r}" for key in differing)
        raise UsageError(f"settings differ from the run's ({details})", str(run_dir / PARAMS_FILE),
                         "repeat the run's flags and hparams, or start a new run without --continue_from_run")


def dataset_fingerprint(records) -> str:
    """Hash of the records a run edits, in order: a resumed run must edit the same ones."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


def check_resume_dataset(run_dir: Path, stored: dict, fingerprint: str) -> None:
    """Refuse to continue a run whose records changed (old and new cases would be mixed in one run)."""
    if "dataset_fingerprint" not in stored:
        log.warning("%s predates dataset fingerprints: cannot check that its records are unchanged", run_dir)
    elif stored["dataset_fingerprint"] != fingerprint:
        raise UsageError(f"the dataset's records changed since the run started (fingerprint "
                         f"{stored['dataset_fingerprint']}, now {fingerprint})", str(run_dir / PARAMS_FILE),
                         "restore the dataset file the run used, or start a new run without --continue_from_run")


def resumed_run(args) -> tuple[Path, dict]:
    """The run directory named by --continue_from_run (under <results_dir>/<ALG>/) and its params.json."""
    run_dir = Path(args.results_dir) / args.alg_name / args.continue_from_run
    try:
        stored = read_json(run_dir / PARAMS_FILE)
    except FileNotFoundError:
        raise UsageError(f"--continue_from_run {args.continue_from_run}: {run_dir / PARAMS_FILE} "
                         f"does not exist") from None
    except ValueError as error:
        raise UsageError(f"{run_dir / PARAMS_FILE} is not valid JSON ({error}); cannot continue that run") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict):
        raise UsageError(f"{run_dir / PARAMS_FILE} is not a params file of this CLI (no 'args'); cannot continue it")
    return run_dir, stored


# ---------------------------------------------------------------- case files and checkpoint

def case_path(run_dir: Path, case_id) -> Path:
    return run_dir / f"case_{case_id}.json"


def batch_is_complete(run_dir: Path, batch: int, case_ids: list) -> bool:
    """Every case file of the batch exists, parses, and belongs to this batch with pre and post results."""
    for case_id in case_ids:
        try:
            case = read_json(case_path(run_dir, case_id))
        except (OSError, ValueError):
            return False
        if (not isinstance(case, dict) or case.get("case_id") != case_id or case.get("batch") != batch
                or case.get("batch_case_ids") != case_ids or "pre" not in case or "post" not in case):
            return False
    return True


STATE_PREFIX = "state::"  # checkpoint tensors of the sequential edit state (S_t per layer), beside the weights


def save_checkpoint(run_dir: Path, model, hp, batch: int) -> None:
    """The edited matrices after `batch` (sequential mode) and the edit state (earlier edits' key
    covariances), in one file so that they always belong together, with that batch's index."""
    state = {STATE_PREFIX + name: tensor for name, tensor in sequential_state(model).items()}
    write_tensors_atomic(run_dir / CHECKPOINT_FILE, {**orig_weights(model, hp), **state}, {"last_batch": str(batch)})


def load_checkpoint(run_dir: Path, model, hp) -> int:
    """Put the checkpoint's edited matrices and edit state into the model; the index of the last batch they
    hold (-1: none)."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return -1
    expected = {name: weight.shape for name, weight in orig_weights(model, hp).items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            last_batch = int((f.metadata() or {})["last_batch"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise UsageError(f"{path} is unreadable ({type(error).__name__}: {error}); start a new run") from None
    weights = {name: t for name, t in tensors.items() if not name.startswith(STATE_PREFIX)}
    if {name: weight.shape for name, weight in weights.items()} != expected:
        raise UsageError(f"{path} holds {sorted(weights)}, not the matrices this edit changes {sorted(expected)}")
    restore_weights(model, weights)
    load_sequential_state(model, {name[len(STATE_PREFIX):]: t for name, t in tensors.items()
                                  if name.startswith(STATE_PREFIX)})
    return last_batch


# ---------------------------------------------------------------- one batch

@dataclass
class Session:
    args: argparse.Namespace
    hp: object
    apply: object
    model: object
    tok: object
    records: object
    generation: GenerationSettings | None
    generation_info: dict
    run_dir: Path
    params: dict
    initial_weights: dict  # W_0 of the edited matrices, on the CPU (matrix health)
    downstream_tasks: list | None  # loaded DownstreamTasks when --do_downstream_eval
    perplexity_chunks: list | None
    perplexity_source: dict | None


def batch_metrics(session: Session, indices: list) -> list[tuple[dict, str]]:
    """Per record of `indices`, its metrics on the model as it is now (CounterFact: the prompts of every case
    of the batch scored together) and whether the generation tests ran (or why not)."""
    args, records = session.args, [session.records[i] for i in indices]
    if args.ds_name == "zsre":
        return [(zsre_case_metrics(session.model, session.tok, record), "skipped: zsRE has no generation tests")
                for record in records]
    results = []
    for index, record, metrics in zip(indices, records, counterfact_metrics_many(session.model, session.tok, records)):
        if session.generation is None:
            results.append((metrics, f"skipped: {session.generation_info['reason']}"))
        elif index % args.generation_test_interval != 0:
            results.append((metrics, f"skipped: case {index} of the dataset is not a multiple of "
                                     f"--generation_test_interval {args.generation_test_interval}"))
        else:
            results.append(({**metrics, "generation": session.generation.evaluate(session.model, session.tok,
                                                                                   record)}, "run"))
    return results


def case_edit_reports(report: dict, n_requests: int) -> list[dict]:
    """Per request, in order: its own target optimisation and the layers of the edit that wrote it
    (ROME writes each fact by its own edit; MEMIT and EMMET write the whole batch at once)."""
    entries = [{"objective": edit["objective"], "target_module": edit["target_module"], "target_optimisation": info,
                "layers": edit["layers"]}
               for edit in report["batches"] for info in edit["target_optimisation"]]
    if len(entries) != n_requests:
        raise RuntimeError(f"the edit report describes {len(entries)} requests, expected {n_requests}")
    return entries


def edit_batch(session: Session, requests: list) -> tuple[float, dict]:
    """Write the requests into the model; (seconds, the algorithm's report)."""
    args = session.args
    target_cache_dir = G.kv_dir() if args.use_cache and not args.sequential else None
    report = {}
    started = time.perf_counter()
    session.apply(session.model, session.tok, requests, session.hp, copy=False, return_orig_weights=False,
                  report=report, seed=args.seed, stats_dir=args.stats_dir, target_cache_dir=target_cache_dir,
                  published_stats_dir=args.published_stats_dir, solve_device="cpu" if args.conserve_memory else None)
    return time.perf_counter() - started, report


def run_batch(session: Session, batch: int, indices: list, edits_done: int) -> None:
    """Evaluate, edit, evaluate again; one case file per case and one weight_norms.jsonl line."""
    args, run_dir = session.args, session.run_dir
    records = [session.records[i] for i in indices]
    case_ids = [record["case_id"] for record in records]
    pre = batch_metrics(session, indices)
    saved = orig_weights(session.model, session.hp)
    if args.conserve_memory:
        saved = {name: weight.cpu() for name, weight in saved.items()}
    requests = [{"case_id": record["case_id"], **record["requested_rewrite"]} for record in records]
    edit_time, report = edit_batch(session, requests)
    if not session.params["statistics"]:
        first_edit = report["batches"][0]
        session.params["statistics"] = {layer["module"]: layer["statistics"] for layer in first_edit["layers"]}
        write_json_atomic(run_dir / PARAMS_FILE, session.params)
    post = [metrics for metrics, _ in batch_metrics(session, indices)]
    norms = lifelong.weight_norms(orig_weights(session.model, session.hp), session.initial_weights, saved)
    if not args.sequential:
        restore_weights(session.model, saved)
    with interrupts_deferred():  # a batch's files are written as a whole
        for record, (pre_metrics, generation_test), post_metrics, edit in zip(
                records, pre, post, case_edit_reports(report, len(requests))):
            write_json_atomic(case_path(run_dir, record["case_id"]), {
                "case_id": record["case_id"], "batch": batch, "batch_case_ids": case_ids,
                "num_edits": args.num_edits, "sequential": args.sequential,
                "requested_rewrite": record["requested_rewrite"], "edit_time": edit_time,
                "generation_test": generation_test, "pre": pre_metrics, "post": post_metrics, "edit": edit})
        lifelong.record_weight_norms(run_dir, {"batch": batch, "num_edits_done": edits_done + len(indices),
                                               "case_ids": case_ids, "edit_time": edit_time, "matrices": norms})


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) inside the block takes effect when it ends, so the run stops between writes."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can handle signals
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# ---------------------------------------------------------------- sequential checkpoints

def health_checks(session: Session, edits_before: int, edits_after: int, batch: int, is_last: bool) -> None:
    """The checkpoints due once the edits went from `edits_before` to `edits_after` (with `batch`; -1 and
    0 edits: the unedited model). After the last batch, the final scores come first and a retention
    checkpoint due then reuses them. Each file that already exists is kept: a resumed run fills in only what
    is missing, for the model state it has now."""
    args, run_dir, model, tok = session.args, session.run_dir, session.model, session.tok
    final = final_scores(session, batch) if is_last else None  # the last model: scored once, for both
    if edits_after > 0 and lifelong.is_due(args.retention_eval_steps, edits_before, edits_after):
        path = lifelong.checkpoint_path(run_dir, "retention", edits_after)
        if lifelong.read_checkpoint(path) is None:
            edited = [session.records[i] for i in range(edits_after)]
            log.info("retention: %s the %d cases edited so far", "from the final scores of" if final is not None else
                     "re-scoring", len(edited))
            write_json_atomic(path, lifelong.retention_checkpoint(model, tok, args.ds_name, edited, edits_after,
                                                                  batch, metrics=final))
    if args.do_downstream_eval and (is_last or edits_after == 0 or
                                    lifelong.is_due(args.downstream_eval_steps, edits_before, edits_after)):
        path = lifelong.checkpoint_path(run_dir, "downstream", edits_after)
        if lifelong.read_checkpoint(path) is None:
            log.info("model health after %d edits: %s", edits_after, ", ".join([*args.downstream_tasks, "perplexity"]))
            write_json_atomic(path, lifelong.downstream_checkpoint(
                model, tok, session.downstream_tasks, session.perplexity_chunks, session.perplexity_source,
                edits_after, batch))
    if edits_after > 0 and ((args.save_model and is_last) or
                            lifelong.is_due(args.model_save_interval, edits_before, edits_after)):
        path = lifelong.model_save_dir(run_dir, edits_after)
        log.info("saving the edited model to %s", path)
        edited_ids = [session.records[i]["case_id"] for i in range(edits_after)]
        lifelong.save_edited_model(model, tok, path, {
            "alg_name": args.alg_name, "model_name": args.model_name, "model_id": session.params["model_id"],
            "run_dir": str(run_dir), "num_edits_done": edits_after, "after_batch": batch,
            "case_ids": edited_ids, "edited_modules": sorted(session.initial_weights),
            "requested_rewrites": [session.records[i]["requested_rewrite"] for i in range(edits_after)]})


def final_scores(session: Session, last_batch: int, chunk: int = 256) -> list[dict]:
    """Sequential mode: "final" in every case file, the case re-scored on the model after the last batch
    (retention). Cases that already have it (a resumed run) are left as they are. Returns every case's
    final metrics, in the records' order."""
    args, run_dir = session.args, session.run_dir
    finals = [read_json(case_path(run_dir, record["case_id"])).get("final") for record in session.records]
    missing = [i for i, final in enumerate(finals) if final is None]
    if missing:
        log.info("final: re-scoring %d cases on the model after the last batch", len(missing))
    for start in range(0, len(missing), chunk):
        indices = missing[start:start + chunk]
        scored = lifelong.score_cases(session.model, session.tok, args.ds_name,
                                      [session.records[i] for i in indices])
        for i, metrics in zip(indices, scored):
            path = case_path(run_dir, session.records[i]["case_id"])
            write_json_atomic(path, {**read_json(path), "final": metrics, "final_after_batch": last_batch,
                                     "final_num_edits_done": len(session.records)})
            finals[i] = metrics
    return finals


# ---------------------------------------------------------------- the run

def prepare(args, default_run: bool) -> Session:
    """Everything checked and loaded before the first edit; UsageError (and other ValueError/OSError) on bad input."""
    if args.continue_from_run is not None:
        run_dir, stored = resumed_run(args)
    path = hparams_path(args.alg_name, args.hparams_fname)
    hparams_class, apply = get_algorithm(args.alg_name)
    hp = hparams_class.from_json(path)
    hparams_from_file = hp.to_dict()
    records, data_dir = load_dataset(args, default_run)
    fingerprint = dataset_fingerprint(records)
    args.data_dir = str(data_dir)
    log.info("data dir: %s", data_dir)
    if args.stats_corpus is None and default_run:
        args.stats_corpus = demo_stats_corpus(hp.mom2_dataset, [data_dir, G.data_dir()])
    if args.stats_corpus is not None:
        hp.mom2_dataset = args.stats_corpus
    if hp.mom2_adjustment:
        check_corpus(hp.mom2_dataset)
    if args.continue_from_run is not None:  # fail before the (slow) model load where possible
        check_resume(run_dir, {**stored["args"], "hparams": stored.get("hparams")},
                     {**{key: vars(args)[key] for key in RESULT_ARGS}, "hparams": hparams_from_file})
        check_resume_dataset(run_dir, stored, fingerprint)

    log.info("dataset %s: %d cases from %s", args.ds_name, len(records), records.source)
    health_data_dirs = list(dict.fromkeys(str(d) for d in (data_dir, G.data_dir(), SHARED_DATA_DIR)))
    downstream_tasks = None
    if args.do_downstream_eval:  # a missing or malformed task file fails here, before the model loads
        from experiments.metrics.downstream import load_downstream_tasks

        downstream_tasks = load_downstream_tasks(health_data_dirs, args.downstream_tasks, args.number_of_few_shots,
                                                 args.number_of_tests)
    log.info("model %s on %s in %s", args.model_name, args.device, args.dtype)
    model, tok = load_model(args.model_name, args.device, args.dtype, device_map=args.device_map,
                            offload_folder=str(Path(args.results_dir) / ".offload"))
    check_model_fits(model, hp, path, args)
    model_id, model_revision = model_identity(model)
    log.info("model id %s, revision %s", model_id, model_revision)
    log.info("stats corpus: %s (cache %s)", hp.mom2_dataset if hp.mom2_adjustment else "none (mom2_adjustment off)",
             args.stats_dir)
    if args.use_cache and args.sequential:
        log.info("--use_cache is ignored in sequential mode: each batch's targets depend on the earlier edits")
    # Templates and C0 from the unedited model now: a bad statistics corpus fails here, before any evaluation,
    # and a resumed sequential run continues exactly (its edited weights are loaded later).
    prepare_unedited(model, tok, hp, args.seed, args.stats_dir, args.published_stats_dir)
    generation, generation_info = generation_plan(args, records, data_dir)
    initial_weights = lifelong.matrices_on_cpu(orig_weights(model, hp))
    perplexity_chunks = perplexity_source = None
    health_info = {"run": False}
    if args.do_downstream_eval:
        from experiments.metrics.downstream import load_perplexity_chunks

        perplexity_chunks, perplexity_source = load_perplexity_chunks(
            health_data_dirs, tok, chunk_tokens=min(PERPLEXITY_CHUNK_TOKENS, max_positions(model)))
        health_info = {"run": True, "tasks": {task.name: {"template": task.template, "labels": task.labels,
                                                          **task.source} for task in downstream_tasks},
                       "perplexity": perplexity_source}

    params = {
        "alg_name": args.alg_name, "model_name": args.model_name, "model_id": model_id,
        "model_revision": model_revision, "hparams_fname": str(path), "hparams": hparams_from_file,
        "args": vars(args).copy(), "seed": args.seed, "ds_name": args.ds_name, "dataset_source": records.source,
        "num_cases": len(records), "dataset_fingerprint": fingerprint, "versions": library_versions(),
        "git_commit": git_commit(),
        "device": args.device, "dtype": args.dtype,
        "stats_corpus": hp.mom2_dataset if hp.mom2_adjustment else None, "generation": generation_info,
        "default_run": default_run, "statistics": {}, "downstream": health_info, "started_at": utc_now(),
        "status": "running",
    }
    params = as_json(params)
    if args.continue_from_run is None:
        run_dir = new_run_dir(Path(args.results_dir) / args.alg_name)
    else:
        check_resume(run_dir, stored, {key: params[key] for key in RESULT_PARAMS})
        params = {**{key: value for key, value in stored.items() if key not in STOP_KEYS}, "status": "running",
                  "resumed_at": stored.get("resumed_at", []) + [utc_now()]}
        lifelong.remove_leftovers(run_dir)  # half-written files of a killed run (never read)
        remove_temp_leftovers(run_dir)
    write_json_atomic(run_dir / PARAMS_FILE, params)
    log.info("run dir: %s", run_dir)
    return Session(args, hp, apply, model, tok, records, generation, generation_info, run_dir, params,
                   initial_weights, downstream_tasks, perplexity_chunks, perplexity_source)


def first_batch_to_run(session: Session, batches: list) -> int:
    """Sequential resume: load the checkpoint; batches up to it must be complete. Batched mode: 0."""
    if not session.args.sequential:
        return 0
    last = load_checkpoint(session.run_dir, session.model, session.hp)
    if last >= len(batches):
        raise UsageError(f"{session.run_dir / CHECKPOINT_FILE} is past the last batch ({last} >= {len(batches)})")
    for batch in range(last + 1):
        case_ids = [session.records[i]["case_id"] for i in batches[batch]]
        if not batch_is_complete(session.run_dir, batch, case_ids):
            raise UsageError(f"{session.run_dir}: case files of batch {batch} are missing or broken, but the "
                             f"sequential checkpoint is past it; its model state is lost: start a new run")
    if last >= 0:
        log.info("sequential resume: edited weights of batches 0..%d loaded from %s", last, CHECKPOINT_FILE)
    return last + 1


def evaluate(session: Session) -> None:
    args, run_dir = session.args, session.run_dir
    started = time.time()
    n = len(session.records)
    batches = [list(range(start, min(start + args.num_edits, n))) for start in range(0, n, args.num_edits)]
    first = first_batch_to_run(session, batches)
    edits_before = [indices[0] for indices in batches]  # cases edited before each batch
    if args.sequential:  # the checkpoints of the state the run starts from: 0 edits, or a resumed state
        done = edits_before[first] if first < len(batches) else n
        health_checks(session, -1 if first == 0 else edits_before[first - 1], done, first - 1,
                      is_last=first == len(batches))
    with tqdm(total=n, unit="case", desc=f"{args.alg_name} {run_dir.name}") as progress:
        for batch, indices in enumerate(batches):
            case_ids = [session.records[i]["case_id"] for i in indices]
            if batch < first or (not args.sequential and batch_is_complete(run_dir, batch, case_ids)):
                log.info("batch %d of %d (cases %s): already done, skipped", batch, len(batches), case_ids)
            else:
                run_batch(session, batch, indices, edits_before[batch])
                if args.sequential:
                    save_checkpoint(run_dir, session.model, session.hp, batch)
                    health_checks(session, edits_before[batch], indices[-1] + 1, batch,
                                  is_last=batch == len(batches) - 1)
                log.info("batch %d of %d (cases %s): done", batch, len(batches), case_ids)
            progress.update(len(indices))
    # total_seconds: this invocation (a continued run's earlier, killed sessions left no end time).
    session.params.update(status="finished", finished_at=utc_now(), total_seconds=time.time() - started)
    write_json_atomic(run_dir / PARAMS_FILE, session.params)


def record_stop(session: Session, status: str, what: str, details: str | None = None) -> None:
    """Why the run stopped before its end, in params.json (when it can still be written)."""
    session.params.update(status=status, stopped_at=utc_now(), error=what,
                          **({"error_traceback": details} if details else {}))
    try:
        write_json_atomic(session.run_dir / PARAMS_FILE, session.params)
    except OSError as error:
        log.warning("could not record the stop in %s: %s", session.run_dir / PARAMS_FILE, error)


def stop_run(session: Session, status: str, what: str, exit_status: int, details: str | None = None) -> int:
    """The run stopped before its end: record it and tell how to go on."""
    run_dir = session.run_dir
    record_stop(session, status, what, details)
    kept = "finished batches are kept" + ("; the traceback is in params.json" if details else "")
    return report(PROG, f"{what} in {run_dir}: {kept}; to go on, run the same command with "
                        f"--continue_from_run {run_dir.name}", exit_status)


def run_evaluation(session: Session) -> int:
    """evaluate(), with every way it can stop turned into a status in params.json and one line on stderr."""
    try:
        evaluate(session)
    except KeyboardInterrupt:
        return stop_run(session, "interrupted", "interrupted (Ctrl-C)", INTERRUPTED_STATUS)
    except InputError as error:  # e.g. a sequential checkpoint that cannot be continued: its message says what to do
        record_stop(session, "failed", one_line(error))
        return report(PROG, error)
    except OSError as error:  # the results directory became unwritable, the disk is full, ...
        reason = f"cannot write {error.filename or 'a results file'} ({error.strerror or error})"
        return stop_run(session, "failed", reason, INPUT_ERROR_STATUS)
    except Exception as error:  # an error inside the edit loop: still a message and a resumable run
        return stop_run(session, "failed", f"{type(error).__name__}: {one_line(error)}", FAILED_STATUS,
                        traceback.format_exc())
    print(f"Results: {session.run_dir}\nSummarize them with: python experiments/summarize.py {session.run_dir}")
    return 0


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (2: bad input, with one message on stderr; 130: Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args, default_run = parse_args(sys.argv[1:] if argv is None else argv)
    except InputError as error:
        return report(PROG, error)
    if default_run:
        log.info("no arguments: running the demo %s", " ".join(DEFAULT_RUN_ARGV))
    try:
        session = prepare(args, default_run)
    except (ValueError, OSError, CorpusUnavailable) as error:  # HparamsError, DatasetNotFound, UsageError, ...
        return report(PROG, error)
    except KeyboardInterrupt:
        return report(PROG, "interrupted (Ctrl-C) in the set-up: nothing was edited; run the command again",
                      INTERRUPTED_STATUS)
    return run_evaluation(session)


if __name__ == "__main__":
    sys.exit(main())
