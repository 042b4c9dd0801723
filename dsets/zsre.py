"""zsRE question answering (MEND format) as edit records, for efficacy/paraphrase/specificity accuracy.

The evaluation set is the authors' `zsre_mend_eval.json` (19,086 records; also known as zsre_mem.json).
When it is unavailable, the 1,000-record MEND *train* subset in zsre_subset/ is used and `source` says so.
zsRE has no true answer to compare against, so records have no target_true (none is invented).
Neighborhood prompts keep the raw NQ question; the references append "?" and split loc_ans into tokens at
evaluation time, which needs the tokenizer.
"""
import logging
from collections.abc import Sequence
from pathlib import Path

from dsets.counterfact import first_n, template_from_sentence
from dsets.editing_eval import zsre_evaluation_prompts
from dsets.download import REMOTE_DSETS, DatasetNotFound, locate, read_json_list, resolve_data_dir

log = logging.getLogger(__name__)

EVAL_FILE = "zsre_mend_eval.json"  # the name the authors serve under REMOTE_DSETS
EVAL_FILE_ALIAS = "zsre_mem.json"
SUBSET_FILE = Path("zsre_subset") / "zsre_mend_train-1k.json"
MEND_KEYS = ("subject", "src", "answers", "rephrase")
PORTABILITY_FIELDS = ("portability", "alternative_subject", "alter_subject_question", "inverse question")
EVAL_SET = {"subset": False, "note": "zsRE evaluation set"}
TRAIN_SUBSET = {"subset": True, "note": "MEND train-split subset (1,000 records), NOT the zsRE evaluation set"}


def mend_to_record(raw: dict, case_id: int, where: str) -> dict | None:
    """One MEND zsRE record as an edit record; None when the subject is not in the question.

    The edit writes answers[0], as the ROME/MEMIT references do. A record of EasyEdit's portability files
    (One Hop, Subject Replace, Inverse Relation) is edited towards `alt` instead, as EasyEdit does: its
    portability questions presuppose that answer. Their files have no NQ neighbourhood question (loc)."""
    template = template_from_sentence(raw["src"], raw["subject"])
    if template is None:
        return None
    portable = any(key in raw for key in PORTABILITY_FIELDS)
    record = {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": template,
            "subject": raw["subject"],
            "target_new": {"str": raw["alt"] if portable else raw["answers"][0]},
        },
        "paraphrase_prompts": [raw["rephrase"]],
        **zsre_evaluation_prompts(raw, where),
    }
    if "loc" in raw and "loc_ans" in raw:
        record["neighborhood_prompts"] = [{"prompt": raw["loc"], "target": raw["loc_ans"]}]
    return record


def read_mend_file(path: Path) -> tuple[list, int]:
    """Edit records (case_id = index in the file) and how many were skipped for lacking the subject."""
    records, skipped = [], 0
    for i, raw in enumerate(read_json_list(path)):
        missing = [k for k in MEND_KEYS if not isinstance(raw, dict) or k not in raw]
        if not missing and any(key in raw for key in PORTABILITY_FIELDS) and "alt" not in raw:
            missing = ["alt"]
        if missing or not isinstance(raw["answers"], list) or not raw["answers"]:
            raise ValueError(f"{path} record {i}: missing {missing or ['answers[0]']} (expected the MEND zsRE format)")
        record = mend_to_record(raw, i, f"{path} record {i}")
        if record is None:
            skipped += 1
        else:
            records.append(record)
    if skipped:
        log.warning("zsRE %s: skipped %d records whose question lacks the subject (or has braces)", path, skipped)
    return records, skipped


def locate_zsre(data_dir: Path) -> tuple[Path, dict]:
    """The evaluation set (local, alias, or downloaded), else the train subset; and what it is."""
    alias = data_dir / EVAL_FILE_ALIAS
    if alias.is_file() and not (data_dir / EVAL_FILE).is_file():
        return alias, EVAL_SET
    try:
        path = locate(EVAL_FILE, data_dir, f"{REMOTE_DSETS}/{EVAL_FILE}")
    except DatasetNotFound as missing:
        subset = data_dir / SUBSET_FILE
        if not subset.is_file():
            raise missing.widened("zsRE (zsre_mend_eval.json)", [alias, subset]) from None
        log.warning("%s Using the 1,000-record MEND train subset %s instead.", missing.failure, subset)
        return subset, TRAIN_SUBSET
    return path, EVAL_SET


class MENDQADataset(Sequence):
    """zsRE edit records: rewrite src -> answers[0], paraphrase = rephrase, neighborhood = NQ (loc, loc_ans)."""

    def __init__(self, data_dir=None, size: int | None = None, dataset_file=None):
        path, about = ((Path(dataset_file), {"subset": None, "note": "--dataset_file"}) if dataset_file is not None
                       else locate_zsre(resolve_data_dir(data_dir)))
        records, skipped = read_mend_file(path)
        self.source = {"schema": "mend", "paths": [str(path)], **about,
                       "skipped_no_template": skipped, "records_in_source": len(records)}
        self.records = first_n(records, size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        return self.records[item]
