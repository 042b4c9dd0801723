"""CounterFact (Meng et al. 2022) as ROME-schema records, from whichever copy the data directory holds.

Preference order: the authors' full `counterfact.json` (downloaded when missing and allowed) > the EasyEdit
reduced files (all 21,919 cases, mapped onto the ROME schema) > ROME-schema subset files in counterfact_rome/.
Fields a source lacks (relation_id, ids, attribute/generation prompts) stay ABSENT: nothing is invented. EasyEdit's
portability/locality fields on ROME-schema records become canonical evaluation prompts (dsets.editing_eval).
`dataset.source` says which copy was used, so a results file can record it.
"""
import logging
from collections.abc import Sequence
from pathlib import Path

from dsets.editing_eval import add_evaluation_prompts
from dsets.download import REMOTE_DSETS, DatasetNotFound, locate, read_json_list, resolve_data_dir
from util.errors import InputError

log = logging.getLogger(__name__)

FULL_FILE = {False: "counterfact.json", True: "multi_counterfact.json"}
EASYEDIT_DIR = "counterfact_easyedit"
EASYEDIT_FILES = ("counterfact-edit.json", "counterfact-train.json", "counterfact-val.json")
EASYEDIT_KEYS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt")
ROME_SUBSET_DIR = "counterfact_rome"


def first_n(records: list, size: int | None) -> list:
    """The dataset_size_limit: the first `size` records (all when None)."""
    if size is None:
        return records
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size (dataset_size_limit) must be a positive integer or None, got {size!r}")
    return records[:size]


def template_from_sentence(sentence: str, subject: str) -> str | None:
    """`sentence` with the first occurrence of `subject` replaced by "{}", so template.format(subject) == sentence.

    None when the subject does not occur, or when the sentence has literal braces (format() would misread them).
    """
    if not subject or subject not in sentence or "{" in sentence or "}" in sentence:
        return None
    return sentence.replace(subject, "{}", 1)


def check_rome_record(record, where: str) -> None:
    """Raise a clear error when a record lacks what the evaluator relies on."""
    def fail(what):
        raise InputError(what, where, "give records in the ROME CounterFact schema")

    if not isinstance(record, dict) or not isinstance(record.get("case_id"), int):
        fail("record is not a dict with an integer case_id")
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        fail(f"case {record['case_id']} has no requested_rewrite dict")
    if not isinstance(rewrite.get("prompt"), str) or "{}" not in rewrite["prompt"]:
        fail(f"case {record['case_id']}: requested_rewrite.prompt must be a template containing '{{}}'")
    if not isinstance(rewrite.get("subject"), str):
        fail(f"case {record['case_id']}: requested_rewrite.subject missing")
    for target in ("target_new", "target_true"):
        if not isinstance(rewrite.get(target), dict) or not isinstance(rewrite[target].get("str"), str):
            fail(f"case {record['case_id']}: requested_rewrite.{target}.str missing")
    for prompts in ("paraphrase_prompts", "neighborhood_prompts"):
        if not isinstance(record.get(prompts), list):
            fail(f"case {record['case_id']}: {prompts} must be a list")


def read_rome_files(paths: list) -> list:
    """Records of ROME-schema files, checked; several files are merged and sorted by case_id."""
    records, seen = [], {}
    for path in paths:
        for i, record in enumerate(read_json_list(path)):
            check_rome_record(record, f"{path} record {i}")
            record = add_evaluation_prompts(record, f"{path} record {i}")
            if record["case_id"] in seen:
                raise InputError(f"case_id {record['case_id']} appears twice", f"{seen[record['case_id']]} and {path}",
                                 "give every record its own case_id")
            seen[record["case_id"]] = path
            records.append(record)
    if len(paths) > 1:
        records.sort(key=lambda r: r["case_id"])
    return records


def easyedit_to_rome(record: dict) -> dict | None:
    """Map one EasyEdit CounterFact record onto the ROME schema; None when its prompt cannot become a template.

    locality_ground_truth is dropped: it always equals ground_truth, which ROME scores neighborhood prompts by.
    """
    template = template_from_sentence(record["prompt"], record["subject"])
    if template is None:
        return None
    return {
        "case_id": record["case_id"],
        "requested_rewrite": {
            "prompt": template,
            "subject": record["subject"],
            "target_new": {"str": record["target_new"]},
            "target_true": {"str": record["ground_truth"]},
        },
        "paraphrase_prompts": [record["rephrase_prompt"]],
        "neighborhood_prompts": [record["locality_prompt"]],
    }


def read_easyedit_files(paths: list) -> tuple[list, int]:
    """ROME-schema records from EasyEdit files (union sorted by case_id) and the number skipped
    (subject not in the prompt, or literal braces in it)."""
    records, skipped = [], 0
    for path in paths:
        for i, raw in enumerate(read_json_list(path)):
            missing = [k for k in EASYEDIT_KEYS if not isinstance(raw, dict) or k not in raw]
            if missing:
                raise ValueError(f"{path} record {i}: missing {missing} (expected the EasyEdit CounterFact format)")
            mapped = easyedit_to_rome(raw)
            if mapped is None:
                skipped += 1
            else:
                records.append(mapped)
    records.sort(key=lambda r: r["case_id"])
    if len({r["case_id"] for r in records}) != len(records):
        raise ValueError(f"duplicate case_id across {[str(p) for p in paths]}")
    return records, skipped


def load_fallback(data_dir: Path, missing: DatasetNotFound) -> tuple[list, dict]:
    """The full file is unavailable: use the EasyEdit full set, else the ROME-schema subset files."""
    easyedit = [data_dir / EASYEDIT_DIR / name for name in EASYEDIT_FILES]
    subset = sorted((data_dir / ROME_SUBSET_DIR).glob("*.json"))
    if all(p.is_file() for p in easyedit):
        records, skipped = read_easyedit_files(easyedit)
        if skipped:
            log.warning("CounterFact (EasyEdit): skipped %d records whose prompt lacks the subject or has braces",
                        skipped)
        source = {"schema": "easyedit", "paths": [str(p) for p in easyedit], "subset": False,
                  "skipped_no_template": skipped,
                  "note": "EasyEdit reduced format mapped to ROME: 1 paraphrase (EasyEdit's own), "
                          "1 neighborhood prompt; no relation_id, ids, attribute or generation prompts"}
    elif subset:
        records = read_rome_files(subset)
        source = {"schema": "rome", "paths": [str(p) for p in subset], "subset": True,
                  "note": "ROME-schema subset, not the full 21,919 cases"}
    else:
        raise missing.widened("CounterFact", easyedit + [data_dir / ROME_SUBSET_DIR / "*.json"]) from None
    log.warning("%s Using %s %s instead.", missing.failure, source["schema"], source["paths"])
    return records, source


def load_counterfact(data_dir: Path, multi: bool) -> tuple[list, dict]:
    name = FULL_FILE[multi]
    try:
        path = locate(name, data_dir, f"{REMOTE_DSETS}/{name}")
    except DatasetNotFound as missing:
        if multi:
            raise
        return load_fallback(data_dir, missing)
    return read_rome_files([path]), {"schema": "rome", "paths": [str(path)], "subset": False}


class CounterFactDataset(Sequence):
    """CounterFact records (ROME schema); `multi` reads MEMIT's multi_counterfact.json instead; `dataset_file`
    reads that ROME-schema file (e.g. one with EasyEdit's portability fields) instead of looking one up."""

    def __init__(self, data_dir=None, multi: bool = False, size: int | None = None, dataset_file=None):
        if dataset_file is not None:
            records = read_rome_files([Path(dataset_file)])
            self.source = {"schema": "rome", "paths": [str(dataset_file)], "subset": True, "note": "--dataset_file"}
        else:
            records, self.source = load_counterfact(resolve_data_dir(data_dir), bool(multi))
        self.source["records_in_source"] = len(records)
        self.records = first_n(records, size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        return self.records[item]


class MultiCounterFactDataset(CounterFactDataset):
    def __init__(self, data_dir=None, size: int | None = None, dataset_file=None):
        super().__init__(data_dir, multi=True, size=size, dataset_file=dataset_file)
