"""Record-level metrics beyond teacher forcing (SPEC §11): generation success of the edit prompts (GES/GPS/GNS)
and the portability/locality prompts, scored by teacher-forced token accuracy and by greedy answers.

Evaluation prompts live on a record as `portability_prompts` / `locality_prompts`:
{kind: [{"prompt": str, "answers": [str, ...]}]}; the first answer is the main one (token accuracy), all of
them are accepted by the greedy answer. Every function batches the prompts of all its records together.
"""
from experiments.metrics.answers import DEFAULT_BATCH_SIZE, generation_success, normalize_answer
from experiments.metrics.counterfact import record_field, rewrite_prompt, score_targets, string_list
from experiments.metrics.zsre import neighborhood_questions

RECORD_KINDS = ("cf", "zsre")
GENERATION_SCORES = (("rewrite_prompts", "GES"), ("paraphrase_prompts", "GPS"), ("neighborhood_prompts", "GNS"))
SECTIONS = {"portability_prompts": "portability", "locality_prompts": "locality"}


def _edit_prompts(record: dict, kind: str) -> dict:
    """{group: [(prompt, target)]}: rewrite and paraphrase prompts against target_new; neighborhood prompts
    against target_true (cf) or their own answers, as questions (zsre)."""
    target_new = record_field(record, "requested_rewrite", "target_new", "str")
    groups = {"rewrite_prompts": [(rewrite_prompt(record), target_new)]}
    if "paraphrase_prompts" in record:
        groups["paraphrase_prompts"] = [(p, target_new) for p in string_list(record, "paraphrase_prompts")]
    if "neighborhood_prompts" in record:
        if kind == "cf":
            target_true = record_field(record, "requested_rewrite", "target_true", "str")
            groups["neighborhood_prompts"] = [(p, target_true) for p in string_list(record, "neighborhood_prompts")]
        else:
            groups["neighborhood_prompts"] = neighborhood_questions(record)
    return groups


def generation_metrics_many(model, tok, records: list, kind: str, full_answers: bool = False,
                            batch_size=DEFAULT_BATCH_SIZE) -> list[dict]:
    """Per record {"rewrite_prompts" | "paraphrase_prompts" | "neighborhood_prompts": [{"answer", "success"}]}
    for the groups it has (kind "cf": CounterFact ROME schema; "zsre": question forms). full_answers: see
    answers.generation_success (False: the same successes, answers cut once decided, much cheaper)."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind must be one of {RECORD_KINDS}, got {kind!r}")
    layouts = [_edit_prompts(record, kind) for record in records]
    pairs = [pair for layout in layouts for group in layout.values() for pair in group]
    results = iter(generation_success(model, tok, [p for p, _ in pairs], [t for _, t in pairs],
                                      full_answers=full_answers, batch_size=batch_size))
    return [{key: [next(results) for _ in group] for key, group in layout.items()} for layout in layouts]


def evaluation_prompts(record: dict, key: str) -> dict:
    """record[key] ("portability_prompts" or "locality_prompts") checked; {} when the record has none."""
    value = record.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(items, list) and all(map(_is_evaluation_prompt, items))
                                              for items in value.values()):
        raise ValueError(f"record (case_id {record.get('case_id', '?')!r}): {key!r} must map each kind to a list "
                         f"of {{'prompt': str, 'answers': [str, ...]}} with at least one answer")
    return value


def _is_evaluation_prompt(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        return False
    answers = entry.get("answers")
    return isinstance(answers, list) and bool(answers) and all(isinstance(answer, str) for answer in answers)


def portability_locality_metrics_many(model, tok, records: list, generation: bool, pre=None,
                                      full_answers: bool = False, batch_size=DEFAULT_BATCH_SIZE) -> list[dict]:
    """Per record {"portability" | "locality": {kind: [per prompt result]}} for the sections it has. A result
    is {"acc": teacher-forced token accuracy of the main answer} plus, when `generation`, the greedy
    {"answer", "success"} (against all answers), and for locality prompts, when `pre` (this function's
    results for the same records on the pre-edit model, with generation) is given, "unchanged": whether the
    normalised greedy answer equals the pre-edit one. Locality answers are always generated in full (the
    comparison needs them); portability answers follow full_answers."""
    if pre is not None and (not generation or len(pre) != len(records)):
        raise ValueError("pre needs generation=True and one pre-edit result per record")
    entries = [(i, SECTIONS[key], kind, item) for i, record in enumerate(records) for key in SECTIONS
               for kind, items in evaluation_prompts(record, key).items() for item in items]
    prompts = [item["prompt"] for *_, item in entries]
    answers = [item["answers"] for *_, item in entries]
    scores = score_targets(model, tok, prompts, [a[0] for a in answers], batch_size) if entries else []
    greedy = [{}] * len(entries)
    if generation and entries:
        whole = [full_answers or section == "locality" for _, section, _, _ in entries]
        greedy = generation_success(model, tok, prompts, answers, full_answers=whole, batch_size=batch_size)
    results = [{} for _ in records]
    for (i, section, kind, _), score, answer in zip(entries, scores, greedy):
        results[i].setdefault(section, {}).setdefault(kind, []).append(
            {"acc": sum(score.correct) / len(score.correct), **answer})
    if pre is not None:
        for i, result in enumerate(results):
            _mark_unchanged(result.get("locality", {}), pre[i].get("locality", {}), records[i])
    return results


def _mark_unchanged(locality: dict, pre_locality: dict, record: dict) -> None:
    for kind, prompts in locality.items():
        before = pre_locality.get(kind, [])
        if len(before) != len(prompts) or not all("answer" in b for b in before):
            raise ValueError(f"record (case_id {record.get('case_id', '?')!r}): the pre-edit results have no "
                             f"greedy answers for its {len(prompts)} {kind!r} locality prompts")
        for result, old in zip(prompts, before):
            result["unchanged"] = normalize_answer(result["answer"]) == normalize_answer(old["answer"])


def _mean(values) -> float:
    return sum(values) / len(values)


def extended_case_scores(metrics: dict) -> dict:
    """Flat per-case scores in [0, 1] from one record's generation_metrics_many and/or
    portability_locality_metrics_many dicts (merged): GES/GPS/GNS (fraction of the group's prompts
    answered right), and per kind present portability_<kind>_acc / _G, locality_<kind>_acc / _G /
    _unchanged. A group, kind or field the metrics lack gives no key (never 0)."""
    scores = {}
    for key, name in GENERATION_SCORES:
        if metrics.get(key):
            scores[name] = _mean([result["success"] for result in metrics[key]])
    for section in SECTIONS.values():
        for kind, results in metrics.get(section, {}).items():
            for field, suffix in (("acc", "acc"), ("success", "G"), ("unchanged", "unchanged")):
                if results and all(field in result for result in results):
                    scores[f"{section}_{kind}_{suffix}"] = _mean([float(result[field]) for result in results])
    return scores
