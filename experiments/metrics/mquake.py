"""MQuAKE multi-hop metrics (SPEC §11, Zhong et al. 2023): after every requested_rewrite of a case is edited,
can the model answer the case's multi-hop questions with the new answer?

Each question is asked after the repository's few-shot prompt (multihop-prompts.txt, "Q: ... A: ..." lines)
as "<fewshot>\\n\\nQ: <question> A:", answered greedily and matched as in answers.prefix_match. The
new_single_hops (the chain of facts after the edit) are asked the same way, one question each.
"""
from dsets.editing_eval import flatten_answers
from experiments.metrics.answers import (
    DEFAULT_BATCH_SIZE,
    answer_text,
    default_max_new_tokens,
    greedy_continuations,
    prefix_match,
)
from experiments.metrics.chat import chat_prompt

QUESTION_FORMAT = "{fewshot}\n\nQ: {question} A:"


def mquake_prompt(fewshot_prompt: str, question: str) -> str:
    return QUESTION_FORMAT.format(fewshot=fewshot_prompt.rstrip(), question=question)


def _answers(record: dict, answer_key: str, alias_key: str, extra_key: str | None = None) -> list[str]:
    """The answer, its aliases and (MQuAKE-T's answer_extended) further accepted answers."""
    return [record[answer_key], *flatten_answers(record.get(alias_key, [])),
            *flatten_answers(record.get(extra_key, []) if extra_key else [])]


def mquake_metrics_many(model, tok, records: list, fewshot_prompt: str, chat_template: bool = False,
                        full_answers: bool = False, batch_size=DEFAULT_BATCH_SIZE) -> list[dict]:
    """Per case {"multihop_questions": [{"answer", "success", "success_original"}] (one per question; success:
    new_answer or an alias; success_original: the pre-edit answer or an alias), "new_single_hops":
    [{"answer", "success"}] (its answer or an alias)}. chat_template: the whole few-shot question is the
    user turn. full_answers=False stops each answer once both matches are decided (answers.match_decided)."""
    rows = []  # (case, group, question, accepted answers, pre-edit answers or None)
    for i, record in enumerate(records):
        new, original = _answers(record, "new_answer", "new_answer_alias"), _answers(
            record, "answer", "answer_alias", "answer_extended")
        rows += [(i, "multihop_questions", question, new, original) for question in record["questions"]]
        rows += [(i, "new_single_hops", hop["question"], _answers(hop, "answer", "answer_alias"), None)
                 for hop in record.get("new_single_hops", [])]
    prompts = [mquake_prompt(fewshot_prompt, question) for _, _, question, _, _ in rows]
    if chat_template:
        prompts = [chat_prompt(tok, prompt) for prompt in prompts]
    targets = [accepted + (original or []) for *_, accepted, original in rows]
    continuations = greedy_continuations(model, tok, prompts, [default_max_new_tokens(tok, t) for t in targets],
                                         batch_size, decide_targets=None if full_answers else targets)
    results = [{"multihop_questions": [], "new_single_hops": []} for _ in records]
    for (i, group, _, accepted, original), continuation in zip(rows, continuations):
        answer = answer_text(continuation)
        result = {"answer": answer, "success": prefix_match(answer, accepted)}
        if original is not None:
            result["success_original"] = prefix_match(answer, original)
        results[i][group].append(result)
    return results


def mquake_case_scores(metrics: dict) -> dict:
    """"multihop": 1.0 when any multi-hop question got the new answer (the case succeeds), else 0.0;
    "multihop_original": the same against the pre-edit answer (the unedited baseline on the unedited model,
    the old fact surviving on the edited one); "single_hop": the fraction of new_single_hops answered
    (absent when the case has none)."""
    multihop = metrics["multihop_questions"]
    scores = {"multihop": float(any(r["success"] for r in multihop)),
              "multihop_original": float(any(r["success_original"] for r in multihop))}
    if metrics.get("new_single_hops"):
        scores["single_hop"] = sum(r["success"] for r in metrics["new_single_hops"]) / len(metrics["new_single_hops"])
    return scores
