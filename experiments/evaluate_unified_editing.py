"""Edit a model with ROME, MEMIT, EMMET, ENCORE or AlphaEdit and evaluate every edited case: the command
researchers run.

    python experiments/evaluate_unified_editing.py --alg_name=EMMET --num_edits=4 --model_name=gpt2-xl \\
        --hparams_fname=gpt2-xl.json --ds_name=cf --sequential=True

With no arguments, a small demo runs on the embedded model with the data shipped in the repository (no network,
no downloads): EMMET on smollm2-135m, 4 CounterFact cases in batches of 2, generation tests on every 2nd case.

The records are cut into consecutive batches of --num_edits. For each batch: every case is evaluated on the
current model (pre), the batch is written into the model by the Editor (algs.editor), every case is
evaluated again (post) and one case_<case_id>.json is written per case. Batched mode then restores the
original weights, so every batch edits the unedited model; sequential mode keeps all edits and saves the
edit state after each batch (edited_weights.safetensors), so a killed run goes on from the same model
state with --continue_from_run. Results: <results_dir>/<ALG>/run_XXX/params.json and the case files.

Sequential (lifelong) runs also record, SPEC §8–§9: every case re-scored after the last batch ("final" in its
case file), the forgetting curve (--retention_eval_steps), model health (--do_downstream_eval: downstream
tasks and WikiText-2 perplexity at 0 edits and every --downstream_eval_steps edits), the norms of the edited
matrices after every batch (weight_norms.jsonl), and optionally the edited model (--save_model,
--model_save_interval).
"""
import logging
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from algs import Editor, algorithm
from algs.editor import hparams_path
from algs.requests import requests_of
from algs.stats_corpus import CorpusUnavailable, check_corpus
from dsets import DATASETS, AttributeSnippets, DatasetNotFound, get_tfidf_vectorizer, load_records
from experiments import lifelong
from experiments.arguments import DEFAULT_RUN_ARGV, RESULT_ARG_DEFAULTS, RESULT_ARGS, parse_args
from experiments.metrics import Evaluation
from experiments.metrics.chat import chat_prompt
from experiments.metrics.generation import GenerationSettings
from experiments.run_store import (RunStore, as_json, dataset_fingerprint, git_commit, library_versions,
                                   utc_now)
from util import globals as G
from util.errors import INPUT_ERROR_STATUS, InputError, UsageError, one_line, report
from util.models import load_model, model_identity

log = logging.getLogger("evaluate_unified_editing")

SHARED_DATA_DIR = G.REPO_ROOT.parent / "shared" / "data"  # health-check data's last fallback, beside the repo
RESULT_PARAMS = ("model_id", "model_revision", "dataset_source", "num_cases")
PERPLEXITY_CHUNK_TOKENS = 256  # WikiText-2 test chunks of this many tokens (fewer if the model's context is shorter)
PROG = "evaluate_unified_editing"
INTERRUPTED_STATUS = 130  # the shell's status for Ctrl-C
FAILED_STATUS = 1  # an unexpected error during the run (not bad input)


@dataclass
class Run:
    """One invocation: its arguments, the Editor, the records, how they are scored and where results go."""

    args: object
    editor: Editor
    records: list
    evaluation: Evaluation
    generation: GenerationSettings | None  # fluency/consistency tests (CounterFact), None when skipped
    generation_info: dict
    health: lifelong.HealthChecks | None
    store: RunStore


# ---------------------------------------------------------------- inputs

def load_dataset(args) -> tuple:
    """The records and the data dir they came from."""
    data_dir = Path(args.data_dir or G.data_dir()).expanduser().resolve()
    return load_records(args.ds_name, data_dir, args.dataset_size_limit, args.dataset_file), data_dir


def max_positions(model) -> int:
    """The longest sequence the model takes (perplexity chunks must fit)."""
    config = model.config
    return next((value for name in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(value := getattr(config, name, None), int)), PERPLEXITY_CHUNK_TOKENS)


def generation_plan(args, records, data_dir: Path) -> tuple:
    """(GenerationSettings or None, what params.json records about the generation tests)."""
    if not DATASETS[args.ds_name].generation_tests:
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


def load_health_checks(args, data_dirs: list, tok=None, model=None):
    """The downstream tasks (before the model loads: a missing file fails early) or, given the model, the
    HealthChecks with perplexity chunks; None without --do_downstream_eval."""
    if not args.do_downstream_eval:
        return None
    from experiments.metrics.downstream import load_downstream_tasks, load_perplexity_chunks

    tasks = load_downstream_tasks(data_dirs, args.downstream_tasks, args.number_of_few_shots, args.number_of_tests)
    if model is None:
        return tasks
    chunks, source = load_perplexity_chunks(data_dirs, tok,
                                            chunk_tokens=min(PERPLEXITY_CHUNK_TOKENS, max_positions(model)))
    return lifelong.HealthChecks(tasks, chunks, source)


def evaluation_plan(args, data_dirs: list) -> tuple[Evaluation, dict]:
    """How the records are scored (their kind's metrics, --generation_metrics, --chat_template, MQuAKE's
    few-shot prompt) and what params.json records about it; a missing few-shot file fails before the model."""
    kind = DATASETS[args.ds_name].kind
    info = {"kind": kind, "generation_metrics": args.generation_metrics, "chat_template": args.chat_template}
    fewshot = None
    if kind == "mquake":
        from dsets.mquake import load_fewshot_prompt

        fewshot, info["fewshot_prompt"] = load_fewshot_prompt_from(load_fewshot_prompt, data_dirs)
    return Evaluation(kind, args.generation_metrics, args.chat_template, fewshot), info


def load_fewshot_prompt_from(load, data_dirs: list) -> tuple[str, str]:
    """MQuAKE's few-shot prompt from the first data dir that has it, and which one that was."""
    for data_dir in data_dirs[:-1]:
        try:
            return load(data_dir), str(data_dir)
        except DatasetNotFound:
            continue
    return load(data_dirs[-1]), str(data_dirs[-1])


def health_info(health) -> dict:
    if health is None:
        return {"run": False}
    return {"run": True, "tasks": {task.name: {"template": task.template, "labels": task.labels, **task.source}
                                   for task in health.tasks}, "perplexity": health.perplexity_source}


# ---------------------------------------------------------------- set-up

def prepare(args, default_run: bool) -> Run:
    """Everything checked and loaded before the first edit; UsageError (and other ValueError/OSError) on bad input."""
    entry = algorithm(args.alg_name)
    path = hparams_path(entry.hparams_dir, args.hparams_fname)
    hp = entry.load_hparams(str(path))
    hparams_from_file = hp.to_dict()
    records, data_dir = load_dataset(args)
    fingerprint = dataset_fingerprint(records)
    args.data_dir = str(data_dir)
    log.info("data dir: %s", data_dir)
    if args.stats_corpus is not None:
        hp.mom2_dataset = args.stats_corpus
    if hp.mom2_adjustment:
        check_corpus(hp.mom2_dataset)
    store = None
    if args.continue_from_run is not None:  # fail before the (slow) model load where possible
        store = RunStore.open_for_resume(Path(args.results_dir) / args.alg_name, args.continue_from_run)
        store.check_same({**{key: vars(args)[key] for key in RESULT_ARGS}, "hparams": hparams_from_file},
                         stored={**store.params["args"], "hparams": store.params.get("hparams")},
                         defaults=RESULT_ARG_DEFAULTS)
        store.check_same_records(fingerprint)

    log.info("dataset %s: %d cases from %s", args.ds_name, len(records), records.source)
    health_data_dirs = list(dict.fromkeys(str(d) for d in (data_dir, G.data_dir(), SHARED_DATA_DIR)))
    load_health_checks(args, health_data_dirs)  # a missing or malformed task file fails here, before the model
    evaluation, evaluation_info = evaluation_plan(args, health_data_dirs)
    log.info("model %s on %s in %s", args.model_name, args.device, args.dtype)
    model, tok = load_model(args.model_name, args.device, args.dtype, device_map=args.device_map,
                            offload_folder=str(Path(args.results_dir) / ".offload"))
    editor = Editor(model, tok, args.alg_name, hp, seed=args.seed, stats_dir=args.stats_dir,
                    published_stats_dir=args.published_stats_dir,
                    solve_device="cpu" if args.conserve_memory else None,
                    target_cache_dir=G.kv_dir() if args.use_cache and not args.sequential else None,
                    hparams_source=f"{path} (for {args.model_name})")
    model_id, model_revision = model_identity(model)
    log.info("model id %s, revision %s", model_id, model_revision)
    log.info("stats corpus: %s (cache %s)", hp.mom2_dataset if hp.mom2_adjustment else "none (mom2_adjustment off)",
             args.stats_dir)
    if args.use_cache and args.sequential:
        log.info("--use_cache is ignored in sequential mode: each batch's targets depend on the earlier edits")
    # Templates and C0 from the unedited model now: a bad statistics corpus fails here, before any evaluation,
    # and a resumed sequential run continues exactly (its edited weights are loaded later).
    if args.chat_template:  # a tokenizer without one fails here, before any work
        chat_prompt(tok, "?")
    editor.prepare()
    generation, generation_info = generation_plan(args, records, data_dir)
    health = load_health_checks(args, health_data_dirs, tok, model)
    params = as_json({
        "alg_name": args.alg_name, "model_name": args.model_name, "model_id": model_id,
        "model_revision": model_revision, "hparams_fname": str(path), "hparams": hparams_from_file,
        "args": vars(args).copy(), "seed": args.seed, "ds_name": args.ds_name, "dataset_source": records.source,
        "num_cases": len(records), "dataset_fingerprint": fingerprint, "versions": library_versions(),
        "git_commit": git_commit(), "device": args.device, "dtype": args.dtype,
        "stats_corpus": hp.mom2_dataset if hp.mom2_adjustment else None, "generation": generation_info,
        "default_run": default_run, "evaluation": evaluation_info, "statistics": {},
        "downstream": health_info(health), "started_at": utc_now(),
        "status": "running",
    })
    if store is None:
        store = RunStore.create(Path(args.results_dir) / args.alg_name, params)
    else:
        store.check_same({key: params[key] for key in RESULT_PARAMS})
        store.resume()
    log.info("run dir: %s", store.run_dir)
    return Run(args, editor, list(records), evaluation, generation, generation_info, health, store)


# ---------------------------------------------------------------- one batch

def batch_metrics(run: Run, indices: list, pre: list | None = None) -> list[tuple[dict, str]]:
    """Per record of `indices`, its metrics on the model as it is now (the prompts of every case of the batch
    scored together; `pre`: their pre-edit metrics) and whether the generation tests ran (or why not)."""
    args, model, tok = run.args, run.editor.model, run.editor.tokenizer
    records = [run.records[i] for i in indices]
    results = []
    for index, record, metrics in zip(indices, records, run.evaluation.metrics(model, tok, records, pre)):
        if run.generation is None:
            results.append((metrics, f"skipped: {run.generation_info['reason']}"))
        elif index % args.generation_test_interval != 0:
            results.append((metrics, f"skipped: case {index} of the dataset is not a multiple of "
                                     f"--generation_test_interval {args.generation_test_interval}"))
        else:
            results.append(({**metrics, "generation": run.generation.evaluate(model, tok, record)}, "run"))
    return results


def case_edit_reports(report: dict, requests_per_case: list) -> list[dict]:
    """Per case, in order: its request's own target optimisation and the layers of the edit that wrote it
    (ROME writes each fact by its own edit; MEMIT and EMMET write the whole batch at once); a case with several
    requests (MQuAKE) gets {"requests": [one such entry per request]}."""
    entries = [{"objective": edit["objective"], "target_module": edit["target_module"], "target_optimisation": info,
                "layers": edit["layers"]}
               for edit in report["batches"] for info in edit["target_optimisation"]]
    if len(entries) != sum(requests_per_case):
        raise RuntimeError(f"the edit report describes {len(entries)} requests, expected {sum(requests_per_case)}")
    cases, start = [], 0
    for count in requests_per_case:
        cases.append(entries[start] if count == 1 else {"requests": entries[start:start + count]})
        start += count
    return cases


def edit_batch(run: Run, requests: list) -> tuple[float, dict]:
    """Write the requests into the model; (seconds, the Editor's report)."""
    started = time.perf_counter()
    report = run.editor.edit(requests)
    return time.perf_counter() - started, report


def run_batch(run: Run, batch: int, indices: list, edits_done: int) -> None:
    """Evaluate, edit, evaluate again; one case file per case and one weight_norms.jsonl line."""
    args, store = run.args, run.store
    records = [run.records[i] for i in indices]
    case_ids = [record["case_id"] for record in records]
    pre = batch_metrics(run, indices)
    requests = [requests_of(record) for record in records]
    edit_time, report = edit_batch(run, [request for case in requests for request in case])
    if not store.params["statistics"]:
        first_edit = report["batches"][0]
        store.params["statistics"] = {layer["module"]: layer["statistics"] for layer in first_edit["layers"]}
        store.write_params()
    post = [metrics for metrics, _ in batch_metrics(run, indices, [metrics for metrics, _ in pre])]
    if not args.sequential:
        run.editor.restore()
    with interrupts_deferred():  # a batch's files are written as a whole
        for record, (pre_metrics, generation_test), post_metrics, edit in zip(
                records, pre, post, case_edit_reports(report, [len(case) for case in requests])):
            store.write_case({
                "case_id": record["case_id"], "batch": batch, "batch_case_ids": case_ids,
                "num_edits": args.num_edits, "sequential": args.sequential,
                "requested_rewrite": record["requested_rewrite"], "edit_time": edit_time,
                "generation_test": generation_test, "pre": pre_metrics, "post": post_metrics, "edit": edit})
        store.record_weight_norms({"batch": batch, "num_edits_done": edits_done + len(indices), "case_ids": case_ids,
                                   "edit_time": edit_time, "matrices": report["weight_norms"]})


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


# ---------------------------------------------------------------- the run

def first_batch_to_run(run: Run, batches: list) -> int:
    """Sequential resume: load the checkpoint; batches up to it must be complete. Batched mode: 0."""
    store = run.store
    if not run.args.sequential or not store.checkpoint_path.exists():
        return 0
    last = int(run.editor.load_state(store.checkpoint_path).get("last_batch", -1))
    if last >= len(batches):
        raise UsageError(f"{store.checkpoint_path} is past the last batch ({last} >= {len(batches)})")
    for batch in range(last + 1):
        case_ids = [run.records[i]["case_id"] for i in batches[batch]]
        if not store.batch_is_complete(batch, case_ids):
            raise UsageError(f"{store.run_dir}: case files of batch {batch} are missing or broken, but the "
                             f"sequential checkpoint is past it; its model state is lost: start a new run")
    if last >= 0:
        log.info("sequential resume: edited weights of batches 0..%d loaded from %s", last, store.checkpoint_path.name)
    return last + 1


def evaluate(run: Run) -> None:
    args, store = run.args, run.store
    started = time.time()
    n = len(run.records)
    batches = [list(range(start, min(start + args.num_edits, n))) for start in range(0, n, args.num_edits)]
    first = first_batch_to_run(run, batches)
    edits_before = [indices[0] for indices in batches]  # cases edited before each batch
    if args.sequential:  # the checkpoints of the state the run starts from: 0 edits, or a resumed state
        done = edits_before[first] if first < len(batches) else n
        lifelong.health_checks(run, -1 if first == 0 else edits_before[first - 1], done, first - 1,
                               is_last=first == len(batches))
    with tqdm(total=n, unit="case", desc=f"{args.alg_name} {store.run_dir.name}") as progress:
        for batch, indices in enumerate(batches):
            case_ids = [run.records[i]["case_id"] for i in indices]
            if batch < first or (not args.sequential and store.batch_is_complete(batch, case_ids)):
                log.info("batch %d of %d (cases %s): already done, skipped", batch, len(batches), case_ids)
            else:
                run_batch(run, batch, indices, edits_before[batch])
                if args.sequential:
                    run.editor.save_state(store.checkpoint_path, {"last_batch": str(batch)})
                    lifelong.health_checks(run, edits_before[batch], indices[-1] + 1, batch,
                                           is_last=batch == len(batches) - 1)
                log.info("batch %d of %d (cases %s): done", batch, len(batches), case_ids)
            progress.update(len(indices))
    # total_seconds: this invocation (a continued run's earlier, killed sessions left no end time).
    store.params.update(status="finished", finished_at=utc_now(), total_seconds=time.time() - started)
    store.write_params()


def stop_run(run: Run, status: str, what: str, exit_status: int, details: str | None = None) -> int:
    """The run stopped before its end: record it and tell how to go on."""
    run_dir = run.store.run_dir
    run.store.record_stop(status, what, details)
    kept = "finished batches are kept" + ("; the traceback is in params.json" if details else "")
    return report(PROG, f"{what} in {run_dir}: {kept}; to go on, run the same command with "
                        f"--continue_from_run {run_dir.name}", exit_status)


def run_evaluation(run: Run) -> int:
    """evaluate(), with every way it can stop turned into a status in params.json and one line on stderr."""
    try:
        evaluate(run)
    except KeyboardInterrupt:
        return stop_run(run, "interrupted", "interrupted (Ctrl-C)", INTERRUPTED_STATUS)
    except InputError as error:  # e.g. a sequential checkpoint that cannot be continued: its message says what to do
        run.store.record_stop("failed", one_line(error))
        return report(PROG, error)
    except OSError as error:  # the results directory became unwritable, the disk is full, ...
        reason = f"cannot write {error.filename or 'a results file'} ({error.strerror or error})"
        return stop_run(run, "failed", reason, INPUT_ERROR_STATUS)
    except Exception as error:  # an error inside the edit loop: still a message and a resumable run
        return stop_run(run, "failed", f"{type(error).__name__}: {one_line(error)}", FAILED_STATUS,
                        traceback.format_exc())
    print(f"Results: {run.store.run_dir}\nSummarize them with: python experiments/summarize.py {run.store.run_dir}")
    return 0


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (2: bad input, with one message on stderr; 130: Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args, default_run = parse_args(sys.argv[1:] if argv is None else argv, description=__doc__)
    except InputError as error:
        return report(PROG, error)
    if default_run:
        log.info("no arguments: running the demo %s", " ".join(DEFAULT_RUN_ARGV))
    try:
        run = prepare(args, default_run)
    except (ValueError, OSError, CorpusUnavailable) as error:  # HparamsError, DatasetNotFound, UsageError, ...
        return report(PROG, error)
    except KeyboardInterrupt:
        return report(PROG, "interrupted (Ctrl-C) in the set-up: nothing was edited; run the command again",
                      INTERRUPTED_STATUS)
    return run_evaluation(run)


if __name__ == "__main__":
    sys.exit(main())
