"""Evaluation of edit records on a model, the same for the CLI and for Python (SPEC §6, §11, §12).

    from experiments.metrics import evaluate, mean_scores
    cases = evaluate(ed.model, ed.tokenizer, records)          # per case: {"case_id", "metrics", "scores"}
    print(mean_scores([case["scores"] for case in cases]))     # ES/PS/NS (and S), ... as means over cases

A record's kind picks its teacher-forced metrics: "cf" (CounterFact: target_new against target_true by NLL,
ES/PS/NS/EM/PM/NM) or "zsre" (token accuracy of the answer: zsRE, KnowEdit, requests without a true target).
"""
import math
from dataclasses import dataclass

from experiments.metrics.counterfact import counterfact_case_scores, counterfact_metrics_many, harmonic_mean
from experiments.metrics.zsre import zsre_case_metrics, zsre_case_scores

KINDS = ("cf", "zsre")
MAIN_SCORES = ("ES", "PS", "NS")


def record_kind(record: dict) -> str:
    """"cf" when the record has a true target to compare against and plain neighbourhood prompts, else "zsre"."""
    rewrite = record.get("requested_rewrite", record)
    neighbours = record.get("neighborhood_prompts", [])
    if "target_true" in rewrite and not any(isinstance(prompt, dict) for prompt in neighbours):
        return "cf"
    return "zsre"


@dataclass(frozen=True)
class Evaluation:
    """What is measured on each record: the kind's teacher-forced metrics."""

    kind: str = "cf"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"evaluation kind must be one of {KINDS}, got {self.kind!r}")

    def metrics(self, model, tok, records: list) -> list[dict]:
        """Per record, its raw metrics (NLLs or per-token correctness) on the model as it is now, batched."""
        if self.kind == "zsre":
            return [zsre_case_metrics(model, tok, record) for record in records]
        return counterfact_metrics_many(model, tok, records)

    def scores(self, metrics: dict) -> dict:
        """One case's scores (fractions in [0, 1]) from its metrics."""
        return zsre_case_scores(metrics) if self.kind == "zsre" else counterfact_case_scores(metrics)


def evaluate(model, tok, records: list, kind: str | None = None) -> list[dict]:
    """Every record scored on the model as it is now: [{"case_id", "metrics", "scores"}] in order.
    kind: "cf" or "zsre"; default from the first record (record_kind)."""
    records = list(records)
    evaluation = Evaluation(kind or record_kind(records[0]))
    return [{"case_id": record.get("case_id"), "metrics": metrics, "scores": evaluation.scores(metrics)}
            for record, metrics in zip(records, evaluation.metrics(model, tok, records))]


def mean_scores(case_scores: list[dict]) -> dict:
    """The mean over cases of every score, and S = harmonic mean of mean ES, PS, NS when all three exist."""
    names = list(dict.fromkeys(name for scores in case_scores for name in scores))
    means = {}
    for name in names:
        values = [scores[name] for scores in case_scores if name in scores and scores[name] is not None]
        if values:
            means[name] = sum(values) / len(values)
    if all(name in means for name in MAIN_SCORES):
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
