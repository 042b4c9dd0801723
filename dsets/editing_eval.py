"""Canonical portability/locality prompts (SPEC §11) from the raw fields of EasyEdit's evaluation files.

A record carries them as `portability_prompts` / `locality_prompts`: {kind: [{"prompt": str, "answers":
[str, ...]}]}, the first answer the main one. The raw fields each maps (schemas in
../shared/data/editing_eval/README.md):
- CounterFact (ROME schema) + `portability` {"New Question", "New Answer"}: one_hop (reasoning through the
  new fact); + `alternative_subject`: subject_replace, the rewrite prompt about the same entity under
  another name must give target_new; + `distracting_neighborhood_prompts` (the edit stated, then a
  neighborhood prompt): distracting_neighbor, each must still give target_true; + `unrelated_relation`
  {"question", "object"} (another relation of the same subject): relation_specificity.
- zsRE (MEND format) + `alternative_subject` / `alter_subject_question`: subject_replace; + `inverse question`:
  inverse_relation, whose answer is the subject; + `portability` {"New Question", "New Answer"}: one_hop.
  EasyEdit edits these records towards `alt` and the questions presuppose it ("Who is <alt>'s sister?"), so
  their answers are `alt`, not answers[0]: the record they go on must have target_new = alt.
"""
from util.errors import InputError

PORTABILITY_KINDS = ("one_hop", "subject_replace", "inverse_relation", "reasoning", "subject_aliasing",
                     "logical_generalization")
LOCALITY_KINDS = ("relation_specificity", "forgetfulness", "distracting_neighbor")


def flatten_answers(targets) -> list[str]:
    """A target string, a list of alias strings, or KnowEdit's list of alias lists, as one flat list."""
    if isinstance(targets, str):
        return [targets]
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets must be a string or a list of (lists of) strings, got {targets!r}")
    return [answer for item in targets for answer in flatten_answers(item)]


def answer_list(answers, where: str) -> list[str]:
    """A string, a list of aliases, or a list of alias lists, flattened, blank aliases dropped; checked to
    hold strings only, at least one of them non-blank."""
    try:
        flat = [answer for answer in flatten_answers(answers) if answer.strip()]
    except ValueError:
        flat = []
    if not flat:
        raise InputError(f"answers {answers!r}", where, "give at least one non-empty answer string (a string, a list "
                                                         "of aliases, or a list of alias lists)")
    return flat


def evaluation_prompt(prompt, answers, where: str) -> dict:
    """{"prompt", "answers"} checked: a non-empty prompt string and answer_list(answers)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"evaluation prompt {prompt!r}", where, "give a non-empty prompt string")
    return {"prompt": prompt, "answers": answer_list(answers, where)}


def _field(record: dict, key: str, where: str, fields: tuple = ()):
    """record[key], and for a dict its `fields`, present (an InputError naming them otherwise)."""
    value = record.get(key)
    if value is None or (fields and (not isinstance(value, dict) or any(f not in value for f in fields))):
        with_fields = f" with {', '.join(fields)}" if fields else ""
        raise InputError(f"{key!r} is {value!r}", where, f"give {key!r}{with_fields}")
    return value


def with_evaluation_prompts(record: dict, portability: dict, locality: dict) -> dict:
    """A copy of `record` with these kinds added to its portability_prompts / locality_prompts."""
    extended = dict(record)
    for key, kinds in (("portability_prompts", portability), ("locality_prompts", locality)):
        if kinds:
            extended[key] = {**record.get(key, {}), **kinds}
    return extended


def _one_hop(record: dict, where: str) -> list:
    one_hop = _field(record, "portability", where, ("New Question", "New Answer"))
    return [evaluation_prompt(one_hop["New Question"], one_hop["New Answer"], where)]


def add_evaluation_prompts(record: dict, where: str | None = None) -> dict:
    """A ROME-schema CounterFact record with the canonical prompts of the raw fields it has (module docstring);
    `where` names it in errors (default: its case_id)."""
    where = where or f"case_id {record.get('case_id', '?')}"
    rewrite = _field(record, "requested_rewrite", where, ("prompt", "subject", "target_new"))
    portability, locality = {}, {}
    if "portability" in record:
        portability["one_hop"] = _one_hop(record, where)
    if "alternative_subject" in record:
        subject = _field(record, "alternative_subject", where)
        if not isinstance(subject, str) or not subject.strip() or "{}" not in rewrite["prompt"]:
            raise InputError(f"alternative_subject {subject!r} for the template {rewrite['prompt']!r}", where,
                             "give a non-empty alternative_subject and a rewrite prompt with '{}'")
        target_new = _field(rewrite, "target_new", where, ("str",))["str"]
        portability["subject_replace"] = [
            evaluation_prompt(rewrite["prompt"].replace("{}", subject), target_new, where)]
    if "distracting_neighborhood_prompts" in record:
        prompts = _field(record, "distracting_neighborhood_prompts", where)
        target_true = _field(rewrite, "target_true", where, ("str",))["str"]
        if not isinstance(prompts, list):
            raise InputError(f"distracting_neighborhood_prompts is {prompts!r}", where, "give a list of prompts")
        locality["distracting_neighbor"] = [evaluation_prompt(p, target_true, where) for p in prompts]
    if "unrelated_relation" in record:
        unrelated = _field(record, "unrelated_relation", where, ("question", "object"))
        locality["relation_specificity"] = [evaluation_prompt(unrelated["question"], unrelated["object"], where)]
    return with_evaluation_prompts(record, portability, locality)


def zsre_evaluation_prompts(raw: dict, where: str | None = None) -> dict:
    """{"portability_prompts": {...}} of a raw MEND zsRE record's portability fields (module docstring), or {}
    when it has none; merge it into the record built from `raw` (whose target_new must then be raw["alt"])."""
    where = where or f"zsRE record about {raw.get('subject', '?')!r}"
    portability = {}
    if "alternative_subject" in raw or "alter_subject_question" in raw:
        question = _field(raw, "alter_subject_question", where)
        portability["subject_replace"] = [evaluation_prompt(question, _field(raw, "alt", where), where)]
    if "inverse question" in raw:
        question = _field(raw, "inverse question", where)
        portability["inverse_relation"] = [evaluation_prompt(question, _field(raw, "subject", where), where)]
    if "portability" in raw:
        portability["one_hop"] = _one_hop(raw, where)
    return {"portability_prompts": portability} if portability else {}
