"""zsRE metrics (SPEC §6): teacher-forced token accuracy of an answer after a question.

A target token counts as correct when it is the argmax prediction at its position, given the prompt
and the answer's earlier tokens (teacher forced). Efficacy and paraphrase score target_new after the
rewrite prompt and its rephrasings; specificity scores each neighborhood question's own answer
(≈ 24–27 % even unedited). Scoring is counterfact.score_targets, the same helper as the NLLs.
The NQ neighborhood questions come without a question mark; as in the references, "?" is appended
(unless the question already ends with one).
"""
from experiments.metrics.counterfact import (
    DEFAULT_BATCH_SIZE, record_field, rewrite_prompt, score_targets, string_list,
)

SCORED_GROUPS = (
    ("rewrite_prompts_correct", "ES"),
    ("paraphrase_prompts_correct", "PS"),
    ("neighborhood_prompts_correct", "NS"),
)


def _neighborhood(record: dict) -> list[dict]:
    entries = record_field(record, "neighborhood_prompts")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("prompt"), str) and isinstance(e.get("target"), str)
            for e in entries):
        raise ValueError(f"record (case_id {record.get('case_id', '?')!r}): 'neighborhood_prompts' must be "
                         f"a list of {{'prompt': str, 'target': str}}")
    return entries


CHAT_MARK = "chat_template"  # set on records whose prompts a chat template wrapped (experiments.metrics.chat)


def as_question(prompt: str) -> str:
    return prompt if prompt.rstrip().endswith("?") else prompt + "?"


def neighborhood_questions(record: dict) -> list[tuple[str, str]]:
    """(question, answer) of each NQ neighbourhood prompt, "?" appended as the references do (a chat-wrapped
    record has it inside its template already)."""
    wrapped = record.get(CHAT_MARK)
    return [(e["prompt"] if wrapped else as_question(e["prompt"]), e["target"]) for e in _neighborhood(record)]


def zsre_case_metrics(model, tok, record: dict, batch_size=DEFAULT_BATCH_SIZE) -> dict:
    """Per prompt, the list of per-token correctness of its target, for each prompt group the record has."""
    target_new = record_field(record, "requested_rewrite", "target_new", "str")
    groups = {"rewrite_prompts": [(rewrite_prompt(record), target_new)]}
    if "paraphrase_prompts" in record:
        groups["paraphrase_prompts"] = [(p, target_new) for p in string_list(record, "paraphrase_prompts")]
    if "neighborhood_prompts" in record:
        groups["neighborhood_prompts"] = neighborhood_questions(record)

    pairs = [pair for group in groups.values() for pair in group]
    scores = iter(score_targets(model, tok, [p for p, _ in pairs], [t for _, t in pairs], batch_size))
    return {f"{key}_correct": [next(scores).correct for _ in group] for key, group in groups.items()}


def zsre_case_scores(case_metrics: dict) -> dict:
    """ES/PS/NS: token accuracy over all target tokens of the group's prompts (as the references
    average their flat per-token lists). A group absent or empty in the case gives no score."""
    scores = {}
    for key, name in SCORED_GROUPS:
        tokens = [correct for prompt in case_metrics.get(key, []) for correct in prompt]
        if tokens:
            scores[name] = sum(tokens) / len(tokens)
    return scores
