"""Instruments of a sequential (lifelong) run, SPEC §8: retention of earlier edits, matrix health, model
health checkpoints and saved edited models. The CLI decides when; this file computes and writes.

Files in a run directory (each written atomically; a resumed run recomputes only what is missing):
  weight_norms.jsonl             one line per batch: per edited matrix ‖W_t‖_F, ‖W_t − W_0‖_F, ‖Δ_t‖_F
  retention_<N>edits.json        every case edited so far re-scored after N edits (the forgetting curve)
  downstream_<N>edits.json       downstream tasks and perplexity after N edits (model health; N = 0 too)
  edited_model_<N>edits/         save_pretrained of the model after N edits, with edits.json
"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


from experiments.metrics.counterfact import counterfact_case_scores, counterfact_metrics_many
from experiments.metrics.zsre import zsre_case_metrics, zsre_case_scores
from util.io import read_json, write_json_atomic, atomic_path

WEIGHT_NORMS_FILE = "weight_norms.jsonl"
SCORED = ("ES", "PS", "NS", "EM", "PM", "NM")


def checkpoint_path(run_dir: Path, kind: str, edits_done: int) -> Path:
    """retention_<N>edits.json / downstream_<N>edits.json."""
    return Path(run_dir) / f"{kind}_{edits_done}edits.json"


def is_due(interval, edits_before: int, edits_after: int) -> bool:
    """Whether a multiple of `interval` edits was reached by the batch that took the count from before to after."""
    return bool(interval) and interval > 0 and edits_after // interval > edits_before // interval


# ---------------------------------------------------------------- matrix health

def weight_norms(current: dict, initial: dict, previous: dict) -> dict:
    """Per matrix: ‖W_t‖_F, ‖W_t − W_0‖_F and ‖Δ_t‖_F = ‖W_t − W_{t−1}‖_F, in float64."""
    norms = {}
    for name, weight in current.items():
        w = weight.detach().double()
        norms[name] = {"weight_norm": w.norm().item(),
                       "distance_from_initial": (w - initial[name].to(w.device).double()).norm().item(),
                       "update_norm": (w - previous[name].to(w.device).double()).norm().item()}
    return norms


def record_weight_norms(run_dir: Path, line: dict) -> None:
    """Put `line` (with its "batch") into weight_norms.jsonl, replacing an earlier line of the same batch
    (a redone batch after a resume); the file is rewritten atomically, sorted by batch."""
    path = Path(run_dir) / WEIGHT_NORMS_FILE
    lines = [entry for entry in read_jsonl(path) if entry.get("batch") != line["batch"]] + [line]
    lines.sort(key=lambda entry: entry["batch"])
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in lines))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- retention

def score_cases(model, tok, ds_name: str, records: list) -> list[dict]:
    """The case metrics (NLLs, or zsRE token accuracies) of `records` on the model as it is now."""
    if ds_name == "zsre":
        return [zsre_case_metrics(model, tok, record) for record in records]
    return counterfact_metrics_many(model, tok, records)


def case_scores(ds_name: str, metrics: dict) -> dict:
    return zsre_case_scores(metrics) if ds_name == "zsre" else counterfact_case_scores(metrics)


def retention_checkpoint(model, tok, ds_name: str, records: list, edits_done: int, after_batch: int,
                         metrics: list | None = None) -> dict:
    """Every case edited so far, re-scored on the current model: per-case scores and their means.
    `metrics`: the records' metrics on this model when already computed (the final scores)."""
    started = time.perf_counter()
    if metrics is None:
        metrics = score_cases(model, tok, ds_name, records)
    scores = [case_scores(ds_name, case_metrics) for case_metrics in metrics]
    means = {}
    for name in SCORED:
        values = [case[name] for case in scores if name in case]
        if values:
            means[name] = sum(values) / len(values)
    return {"num_edits_done": edits_done, "after_batch": after_batch, "num_cases": len(records),
            "mean": means, "cases": {str(record["case_id"]): score for record, score in zip(records, scores)},
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- model health

def downstream_checkpoint(model, tok, tasks, perplexity_chunks, perplexity_source, edits_done: int,
                          after_batch: int) -> dict:
    """Downstream tasks (label likelihood) and perplexity on the current model."""
    from experiments.metrics.downstream import evaluate_downstream, perplexity

    started = time.perf_counter()
    results = evaluate_downstream(model, tok, tasks) if tasks else {}
    tasks_seconds = time.perf_counter() - started
    ppl_started = time.perf_counter()
    ppl = perplexity(model, tok, perplexity_chunks)
    return {"num_edits_done": edits_done, "after_batch": after_batch, "tasks": results,
            "perplexity": {"value": ppl, **perplexity_source, "seconds": time.perf_counter() - ppl_started},
            "tasks_seconds": tasks_seconds, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- saved models

def model_save_dir(run_dir: Path, edits_done: int) -> Path:
    return Path(run_dir) / f"edited_model_{edits_done}edits"


def save_edited_model(model, tok, path: Path, edits: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + edits.json, into a hidden temporary folder renamed into
    place, so `path` is either absent or complete. An existing `path` is kept (same state, same edits)."""
    path = Path(path)
    if (path / "edits.json").exists():
        return
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmpdir"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "edits.json", edits)
        if path.exists():  # a folder without edits.json: left by an older, interrupted save
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_leftovers(run_dir: Path) -> None:
    """Hidden temporary files and folders of writes a killed run never finished (never read)."""
    for leftover in Path(run_dir).glob(".*.tmp*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def read_checkpoint(path: Path):
    """A checkpoint file's object, or None when absent or unreadable (then it is recomputed)."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def matrices_on_cpu(weights: dict) -> dict:
    return {name: weight.detach().to("cpu", copy=True) for name, weight in weights.items()}

