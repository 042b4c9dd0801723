"""Evaluation of edit records on a model, the same for the CLI and for Python (SPEC §6, §11, §12).

    from experiments.metrics import evaluate, mean_scores
    cases = evaluate(ed.model, ed.tokenizer, records)          # per case: {"case_id", "metrics", "scores"}
    print(mean_scores([case["scores"] for case in cases]))     # ES/PS/NS (and S), ... as means over cases

A record's kind picks its teacher-forced metrics: "cf" (CounterFact: target_new against target_true by NLL,
ES/PS/NS/EM/PM/NM) or "zsre" (token accuracy of the answer: zsRE, KnowEdit, requests without a true target);
"mquake" cases are asked their multi-hop questions. Whatever the kind, a record's portability_prompts and
locality_prompts are scored too (token accuracy; with generation also greedy answers), and with
`generation` every edit prompt gets its greedy answer (GES/GPS/GNS).
"""
import math
from dataclasses import dataclass

from experiments.metrics.chat import with_chat_template
from experiments.metrics.counterfact import counterfact_case_scores, counterfact_metrics_many, harmonic_mean
from experiments.metrics.generative import (extended_case_scores, generation_metrics_many,
                                            portability_locality_metrics_many)
from experiments.metrics.mquake import mquake_case_scores, mquake_metrics_many
from experiments.metrics.zsre import zsre_case_metrics, zsre_case_scores

KINDS = ("cf", "zsre", "mquake")
MAIN_SCORES = ("ES", "PS", "NS")
GENERATED = "generated"  # the metrics key of the greedy answers to the edit prompts (GES/GPS/GNS)


def record_kind(record: dict) -> str:
    """"mquake" for a case with several rewrites and multi-hop questions; "cf" when the record has a true target
    to compare against and plain neighbourhood prompts; else "zsre"."""
    if isinstance(record.get("requested_rewrite"), list):
        return "mquake"
    rewrite = record.get("requested_rewrite", record)
    neighbours = record.get("neighborhood_prompts", [])
    if "target_true" in rewrite and not any(isinstance(prompt, dict) for prompt in neighbours):
        return "cf"
    return "zsre"


@dataclass(frozen=True)
class Evaluation:
    """What is measured on each record: the kind's teacher-forced metrics, the portability/locality prompts it
    carries, and (generation) greedy answers; chat_template wraps every prompt in the tokenizer's chat
    template; fewshot_prompt is MQuAKE's multi-hop prompt."""

    kind: str = "cf"
    generation: bool = False
    chat_template: bool = False
    fewshot_prompt: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"evaluation kind must be one of {KINDS}, got {self.kind!r}")

    def metrics(self, model, tok, records: list, pre: list | None = None) -> list[dict]:
        """Per record, its raw metrics on the model as it is now, batched across records. `pre`: the same
        records' metrics on the pre-edit model (locality answers unchanged or not; only with generation)."""
        if self.kind == "mquake":
            if not self.fewshot_prompt:
                raise ValueError("MQuAKE evaluation needs its few-shot prompt (dsets.mquake.load_fewshot_prompt)")
            return mquake_metrics_many(model, tok, records, self.fewshot_prompt, chat_template=self.chat_template)
        if self.chat_template:
            records = [with_chat_template(record, tok) for record in records]
        if self.kind == "zsre":
            metrics = [zsre_case_metrics(model, tok, record) for record in records]
        else:
            metrics = counterfact_metrics_many(model, tok, records)
        if any(record.get("portability_prompts") or record.get("locality_prompts") for record in records):
            extra = portability_locality_metrics_many(model, tok, records, self.generation,
                                                      pre=pre if self.generation and pre is not None else None)
            metrics = [{**m, **e} for m, e in zip(metrics, extra)]
        if self.generation:
            generated = generation_metrics_many(model, tok, records, self.kind)
            metrics = [{**m, GENERATED: g} for m, g in zip(metrics, generated)]
        return metrics

    def scores(self, metrics: dict) -> dict:
        """One case's scores (fractions in [0, 1]) from its metrics."""
        if self.kind == "mquake":
            return mquake_case_scores(metrics)
        scores = zsre_case_scores(metrics) if self.kind == "zsre" else counterfact_case_scores(metrics)
        return {**scores, **extended_case_scores({**metrics.get(GENERATED, {}), **metrics})}


def evaluate(model, tok, records: list, kind: str | None = None, generation: bool = False,
             chat_template: bool = False, fewshot_prompt: str | None = None, pre: list | None = None) -> list[dict]:
    """Every record scored on the model as it is now: [{"case_id", "metrics", "scores"}] in order.
    kind: "cf", "zsre" or "mquake" (default from the first record, record_kind); generation: also greedy
    answers (GES/GPS/GNS, portability and locality G-metrics); pre: evaluate()'s result for the same records
    before the edit (locality answers unchanged)."""
    records = list(records)
    evaluation = Evaluation(kind or record_kind(records[0]), generation, chat_template, fewshot_prompt)
    pre_metrics = None if pre is None else [case["metrics"] for case in pre]
    return [{"case_id": record.get("case_id"), "metrics": metrics, "scores": evaluation.scores(metrics)}
            for record, metrics in zip(records, evaluation.metrics(model, tok, records, pre_metrics))]


def easyedit_records(prompts, target_new, subject, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
                     portability_inputs=None) -> list[dict]:
    """Evaluation records for requests in EasyEdit's form (what `Editor.edit(prompts=..., ...)` takes), so that
    `evaluate` scores them: rephrase_prompts (one per prompt) are the paraphrases; locality_inputs and
    portability_inputs, EasyEdit's {name: {"prompt": [one per request], "ground_truth": [one per request]}},
    become each record's locality_prompts / portability_prompts under that name. With ground_truth the
    records are CounterFact-like (new against true target by NLL), else scored by token accuracy."""
    from algs.requests import as_requests
    from dsets.editing_eval import evaluation_prompt

    requests = as_requests(prompts=prompts, target_new=target_new, subject=subject, ground_truth=ground_truth,
                           where="easyedit_records")
    records = [{"case_id": i, "requested_rewrite": request} for i, request in enumerate(requests)]
    if rephrase_prompts is not None:
        for record, rephrase in zip(records, [rephrase_prompts] if isinstance(rephrase_prompts, str) else
                                    rephrase_prompts):
            record["paraphrase_prompts"] = [rephrase] if isinstance(rephrase, str) else list(rephrase)
    for key, inputs in (("locality_prompts", locality_inputs), ("portability_prompts", portability_inputs)):
        for name, columns in (inputs or {}).items():
            for i, (prompt, answer) in enumerate(zip(columns["prompt"], columns["ground_truth"])):
                records[i].setdefault(key, {})[name] = [evaluation_prompt(prompt, answer, f"{key[:-8]} {name!r} {i}")]
    return records


def mean_scores(case_scores: list[dict], with_s: bool = True) -> dict:
    """The mean over cases of every score, and (with_s) S = harmonic mean of mean ES, PS, NS when all three
    exist."""
    names = list(dict.fromkeys(name for scores in case_scores for name in scores))
    means = {}
    for name in names:
        values = [scores[name] for scores in case_scores if name in scores and scores[name] is not None]
        if values:
            means[name] = sum(values) / len(values)
    if with_s and all(name in means for name in MAIN_SCORES):
        means["S"] = harmonic_mean([means[name] for name in MAIN_SCORES])
    return means


def format_table(header: list, rows: list, title: str | None = None) -> str:
    """A plain-text table: numbers to 4 significant digits (percent-like values are the caller's business)."""
    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ([title] if title else []) + ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
                                         "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
