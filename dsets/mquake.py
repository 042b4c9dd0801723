"""MQuAKE (Zhong et al. 2023) multi-hop cases, kept in their own schema, and the few-shot prompt they are asked with.

A case: case_id, requested_rewrite (a list of CounterFact-style edits, prompts with "{}"), 3 multi-hop
`questions`, answer / answer_alias (before the edits), new_answer / new_answer_alias (after them),
single_hops / new_single_hops [{question, cloze, answer, answer_alias}], orig; MQuAKE-T adds answer_extended.
Every case is checked at load time. Files (when no dataset_file is given) are looked up in
<data_dir>/mquake/ and then <data_dir>/editing_eval/mquake/ by the names in MQUAKE_FILES, in that order.
"""
from collections.abc import Sequence
from pathlib import Path

from dsets.counterfact import first_n
from dsets.download import DatasetNotFound, read_json_list, resolve_data_dir
from dsets.editing_eval import answer_list
from util.checks import check_request, target_text
from util.errors import InputError

MQUAKE_FILES = ("MQuAKE-CF-3k-v2.json", "MQuAKE-CF-3k.json", "MQuAKE-CF.json", "MQuAKE-T.json")
SEARCH_DIRS = (Path("mquake"), Path("editing_eval") / "mquake")
FEWSHOT_FILE = "multihop-prompts.txt"
FEWSHOT_DIRS = (Path("mquake_prompts"), Path("editing_eval") / "mquake_prompts")
N_QUESTIONS = 3
FIX = "give cases in MQuAKE's format (see the MQuAKE repository README)"


def _first_file(places: list, what: str) -> Path:
    found = next((path for path in places if path.is_file()), None)
    if found is None:
        raise DatasetNotFound(what, places, None, "There is no public download for it here "
                              "(it is in the princeton-nlp/MQuAKE repository).")
    return found


def _check_hops(hops, where: str) -> None:
    if not isinstance(hops, list):
        raise InputError(f"new_single_hops is {hops!r}", where, FIX)
    for j, hop in enumerate(hops):
        if not isinstance(hop, dict) or not isinstance(hop.get("question"), str) or not hop["question"].strip():
            raise InputError(f"new_single_hops[{j}] has no question", where, FIX)
        answer_list([hop.get("answer"), hop.get("answer_alias", [])], f"{where} new_single_hops[{j}]")


def check_mquake_record(record, where: str) -> None:
    """One InputError naming the case for the first thing an evaluation would trip over."""
    if not isinstance(record, dict) or isinstance(record.get("case_id"), bool) or not isinstance(
            record.get("case_id"), int):
        raise InputError("case is not a dict with an integer case_id", where, FIX)
    where = f"{where} (case_id {record['case_id']})"
    edits = record.get("requested_rewrite")
    if not isinstance(edits, list) or not edits:
        raise InputError("requested_rewrite is not a non-empty list of edits", where, FIX)
    for j, edit in enumerate(edits):
        check_request(edit, f"{where} requested_rewrite[{j}]")
        target_text(edit, "target_true", f"{where} requested_rewrite[{j}]")
    questions = record.get("questions")
    if not isinstance(questions, list) or len(questions) != N_QUESTIONS or not all(
            isinstance(q, str) and q.strip() for q in questions):
        raise InputError(f"questions is {questions!r}", where, f"give {N_QUESTIONS} multi-hop question strings")
    for answer, aliases in (("new_answer", "new_answer_alias"), ("answer", "answer_alias")):
        answer_list([record.get(answer), record.get(aliases, [])], f"{where} {answer}/{aliases}")
    if "answer_extended" in record:
        answer_list(record["answer_extended"], f"{where} answer_extended")
    _check_hops(record.get("new_single_hops", []), where)


class MQuAKEDataset(Sequence):
    """MQuAKE cases in their own schema (algs.requests.requests_of gives a case's edits)."""

    def __init__(self, data_dir=None, size: int | None = None, dataset_file=None):
        data_dir = resolve_data_dir(data_dir)
        places = [Path(dataset_file).expanduser()] if dataset_file is not None else [
            data_dir / folder / name for name in MQUAKE_FILES for folder in SEARCH_DIRS]
        path = _first_file(places, "MQuAKE")
        records = read_json_list(path)
        for i, record in enumerate(records):
            check_mquake_record(record, f"{path} case {i}")
        self.source = {"schema": "mquake", "paths": [str(path)], "records_in_source": len(records),
                       "note": "MQuAKE cases: every requested_rewrite of a case is one batch of edits"}
        self.records = first_n(records, size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        return self.records[item]


def load_fewshot_prompt(data_dir=None) -> str:
    """MQuAKE's multi-hop few-shot prompt ("Q: ... A: ..." lines), from mquake_prompts/ in the data directory
    or in its editing_eval/ folder."""
    data_dir = resolve_data_dir(data_dir)
    path = _first_file([data_dir / folder / FEWSHOT_FILE for folder in FEWSHOT_DIRS], f"MQuAKE {FEWSHOT_FILE}")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise InputError("the few-shot prompt is empty", str(path), "give MQuAKE's multihop-prompts.txt")
    return text
