"""--chat_template (SPEC §11): evaluation prompts as the user turn of the tokenizer's chat template, followed
by its generation prompt, so that a chat model is asked the way it was tuned to answer.

Prompts are later tokenized with the tokenizer's own special tokens (util.tokens.prompt_token_ids); a
template that writes the BOS itself would then get a second one, so that written BOS is dropped.
"""
import copy

from experiments.metrics.zsre import CHAT_MARK as MARK, as_question
from util.checks import check_prompt_template
from util.errors import InputError

FLAG = "--chat_template"


def chat_prompt(tok, prompt: str) -> str:
    """`prompt` as the user turn, with the generation prompt (the assistant's answer comes next)."""
    if getattr(tok, "chat_template", None) is None:
        raise InputError(f"the tokenizer of {getattr(tok, 'name_or_path', '') or type(tok).__name__} has no chat "
                         f"template", FLAG, "leave --chat_template off or use a chat model's tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok.bos_token_id in tok("")["input_ids"]:
        text = text[len(bos):]
    return text


def with_chat_template(record: dict, tok) -> dict:
    """A copy of an evaluation record with every evaluation prompt wrapped: the rewrite template (its "{}"
    kept), paraphrase prompts, neighborhood prompts (strings, or zsRE's {"prompt", "target"} questions, "?"
    appended first as the zsRE metric does), portability_prompts and locality_prompts.
    generation_prompts (fluency texts, scored with their prompt) are left as they are, and so are MQuAKE
    cases: their question is wrapped together with its few-shot prompt (mquake_metrics_many(chat_template=True)).
    The copy is marked "chat_template": True: metrics must not append to its prompts (the zsRE "?" is in
    already), and it is never wrapped twice."""
    if record.get(MARK):
        raise ValueError(f"record (case_id {record.get('case_id', '?')!r}) is wrapped in a chat template already")
    wrapped = copy.deepcopy(record)
    wrapped[MARK] = True
    rewrite = wrapped.get("requested_rewrite")
    if isinstance(rewrite, dict) and isinstance(rewrite.get("prompt"), str):
        rewrite["prompt"] = chat_prompt(tok, rewrite["prompt"])
        check_prompt_template(rewrite["prompt"], f"{FLAG} (case_id {record.get('case_id', '?')})")
    if isinstance(wrapped.get("paraphrase_prompts"), list):
        wrapped["paraphrase_prompts"] = [chat_prompt(tok, p) for p in wrapped["paraphrase_prompts"]]
    if isinstance(wrapped.get("neighborhood_prompts"), list):
        wrapped["neighborhood_prompts"] = [
            {**n, "prompt": chat_prompt(tok, as_question(n["prompt"]))} if isinstance(n, dict) else chat_prompt(tok, n)
            for n in wrapped["neighborhood_prompts"]]
    for key in ("portability_prompts", "locality_prompts"):
        for items in wrapped.get(key, {}).values():
            for item in items:
                item["prompt"] = chat_prompt(tok, item["prompt"])
    return wrapped
