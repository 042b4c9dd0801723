"""Instruments of a sequential (lifelong) run, SPEC §8: retention of earlier edits, model health checkpoints
and saved edited models, and when each is due. The matrix norms come with every edit report (algs.editor).

Files in a run directory (each written atomically through the RunStore; a resumed run recomputes only what
is missing):
  retention_<N>edits.json        every case edited so far re-scored after N edits (the forgetting curve)
  downstream_<N>edits.json       downstream tasks and perplexity after N edits (model health; N = 0 too)
  edited_model_<N>edits/         save_pretrained of the model after N edits, with edits.json
"""
import logging
import time
from dataclasses import dataclass

from experiments.metrics import mean_scores

log = logging.getLogger(__name__)

def is_due(interval, edits_before: int, edits_after: int) -> bool:
    """Whether a multiple of `interval` edits was reached by the batch that took the count from before to after."""
    return bool(interval) and interval > 0 and edits_after // interval > edits_before // interval


@dataclass
class HealthChecks:
    """Model health of a sequential run: downstream tasks (loaded DownstreamTasks) and perplexity chunks."""

    tasks: list
    perplexity_chunks: list
    perplexity_source: dict

    def checkpoint(self, model, tok, edits_done: int, after_batch: int) -> dict:
        """Downstream tasks (label likelihood) and perplexity on the current model."""
        from experiments.metrics.downstream import evaluate_downstream, perplexity

        started = time.perf_counter()
        results = evaluate_downstream(model, tok, self.tasks) if self.tasks else {}
        tasks_seconds = time.perf_counter() - started
        ppl_started = time.perf_counter()
        ppl = perplexity(model, tok, self.perplexity_chunks)
        return {"num_edits_done": edits_done, "after_batch": after_batch, "tasks": results,
                "perplexity": {"value": ppl, **self.perplexity_source, "seconds": time.perf_counter() - ppl_started},
                "tasks_seconds": tasks_seconds, "seconds": time.perf_counter() - started}


def retention_checkpoint(evaluation, model, tok, records: list, edits_done: int, after_batch: int,
                         metrics: list | None = None, pre: list | None = None) -> dict:
    """Every case edited so far, re-scored on the current model: per-case scores and their means.
    `metrics`: the records' metrics on this model when already computed (the final scores); `pre`: their
    pre-edit metrics (locality answers unchanged)."""
    started = time.perf_counter()
    if metrics is None:
        metrics = evaluation.metrics(model, tok, records, pre)
    scores = [evaluation.scores(case_metrics) for case_metrics in metrics]
    return {"num_edits_done": edits_done, "after_batch": after_batch, "num_cases": len(records),
            "mean": mean_scores(scores, with_s=False),
            "cases": {str(record["case_id"]): score for record, score in zip(records, scores)},
            "seconds": time.perf_counter() - started}


def final_scores(run, last_batch: int, chunk: int = 256) -> list[dict]:
    """Sequential mode: "final" in every case file, the case re-scored on the model after the last batch
    (retention). Cases that already have it (a resumed run) are left as they are. Returns every case's
    final metrics, in the records' order."""
    store, editor = run.store, run.editor
    cases = [store.read_case(record["case_id"]) for record in run.records]
    finals = [case.get("final") for case in cases]
    missing = [i for i, final in enumerate(finals) if final is None]
    if missing:
        log.info("final: re-scoring %d cases on the model after the last batch", len(missing))
    for start in range(0, len(missing), chunk):
        indices = missing[start:start + chunk]
        scored = run.evaluation.metrics(editor.model, editor.tokenizer, [run.records[i] for i in indices],
                                        [cases[i]["pre"] for i in indices])
        for i, metrics in zip(indices, scored):
            store.write_case({**cases[i], "final": metrics, "final_after_batch": last_batch,
                              "final_num_edits_done": len(run.records)})
            finals[i] = metrics
    return finals


def health_checks(run, edits_before: int, edits_after: int, batch: int, is_last: bool) -> None:
    """The checkpoints due once the edits went from `edits_before` to `edits_after` (with `batch`; -1 and
    0 edits: the unedited model). After the last batch, the final scores come first and a retention
    checkpoint due then reuses them. Each file that already exists is kept: a resumed run fills in only what
    is missing, for the model state it has now."""
    args, store, editor = run.args, run.store, run.editor
    model, tok = editor.model, editor.tokenizer
    final = final_scores(run, batch) if is_last else None  # the last model: scored once, for both
    if edits_after > 0 and is_due(args.retention_eval_steps, edits_before, edits_after):
        if store.read_checkpoint("retention", edits_after) is None:
            edited = [run.records[i] for i in range(edits_after)]
            log.info("retention: %s the %d cases edited so far", "from the final scores of" if final is not None else
                     "re-scoring", len(edited))
            pre = None if final is not None else [store.read_case(record["case_id"])["pre"] for record in edited]
            store.write_checkpoint("retention", edits_after, retention_checkpoint(
                run.evaluation, model, tok, edited, edits_after, batch, metrics=final, pre=pre))
    if run.health is not None and (is_last or edits_after == 0 or
                                   is_due(args.downstream_eval_steps, edits_before, edits_after)):
        if store.read_checkpoint("downstream", edits_after) is None:
            log.info("model health after %d edits: %s", edits_after, ", ".join([*args.downstream_tasks, "perplexity"]))
            store.write_checkpoint("downstream", edits_after, run.health.checkpoint(model, tok, edits_after, batch))
    if edits_after > 0 and ((args.save_model and is_last) or is_due(args.model_save_interval, edits_before,
                                                                     edits_after)):
        path = store.model_dir(edits_after)
        log.info("saving the edited model to %s", path)
        editor.save_pretrained(path, extra={
            "model_name": args.model_name, "model_id": store.params["model_id"], "run_dir": str(store.run_dir),
            "num_edits_done": edits_after, "after_batch": batch,
            "case_ids": [run.records[i]["case_id"] for i in range(edits_after)],
            "requested_rewrites": [run.records[i]["requested_rewrite"] for i in range(edits_after)]})
