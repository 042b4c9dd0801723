"""KnowEdit (Zhang et al. 2024) as ROME-schema edit records with canonical portability/locality prompts.

Variants and their files (looked up in `dataset_file` when given, else in <data_dir>/knowedit/ and then
<data_dir>/editing_eval/knowedit/, by these names in this order):
- "zsre": ZsRE-test-all.json; "counterfact": test_cf.json, train_cf.json, wiki_counterfact_train_cf.json;
  "recent": recent_test.json, recent_train.json, wiki_recent_train.json.
A KnowEdit record {subject, prompt, target_new, ground_truth?, rephrase_prompt?, portability?, locality?}
becomes {case_id: its index in the file, requested_rewrite {prompt: the sentence with "{}" for the subject,
subject, target_new {str}, target_true {str: the first ground truth} when there is one (wiki_recent has
none; an empty ground_truth string counts as none)}, paraphrase_prompts: [rephrase_prompt] when present,
portability_prompts, locality_prompts}. Ground truths (a string, a list of strings, or a list of alias
lists) are flattened into the answers list.
Records whose prompt lacks the subject (or has braces), or whose target_new equals the ground truth (an
edit that changes nothing), are skipped and counted in `source`, as the other loaders do.
"""
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dsets.counterfact import first_n, template_from_sentence
from dsets.download import DatasetNotFound, read_json_list, resolve_data_dir
from dsets.editing_eval import answer_list, evaluation_prompt
from util.errors import InputError

log = logging.getLogger(__name__)

VARIANT_FILES = {
    "zsre": ("ZsRE-test-all.json",),
    "counterfact": ("test_cf.json", "train_cf.json", "wiki_counterfact_train_cf.json"),
    "recent": ("recent_test.json", "recent_train.json", "wiki_recent_train.json"),
}
SEARCH_DIRS = (Path("knowedit"), Path("editing_eval") / "knowedit")
SECTIONS = {
    "portability": {"Reasoning": "reasoning", "Subject_Aliasing": "subject_aliasing",
                    "Logical_Generalization": "logical_generalization"},
    "locality": {"Relation_Specificity": "relation_specificity", "Forgetfulness": "forgetfulness"},
}
FIX = "give records in KnowEdit's format {subject, prompt, target_new, ground_truth, portability, locality}"


def locate_knowedit(variant: str, data_dir=None, dataset_file=None) -> Path:
    """The variant's file: `dataset_file`, else the first of its names found in the search folders."""
    if variant not in VARIANT_FILES:
        raise InputError(f"KnowEdit variant {variant!r}", "KnowEditDataset",
                         f"give one of {', '.join(VARIANT_FILES)}")
    data_dir = resolve_data_dir(data_dir)
    places = [Path(dataset_file).expanduser()] if dataset_file is not None else [
        data_dir / folder / name for name in VARIANT_FILES[variant] for folder in SEARCH_DIRS]
    found = next((path for path in places if path.is_file()), None)
    if found is None:
        raise DatasetNotFound(f"KnowEdit {variant}", places, None, "There is no public download for it here "
                              "(KnowEdit is on the Hugging Face hub, zjunlp/KnowEdit).")
    return found


def _phrasings(prompt) -> list:
    """A prompt, or a list of phrasings of it (EasyEdit reads the first; each is a prompt here)."""
    return prompt if isinstance(prompt, list) else [prompt]


def _section(raw: dict, section: str, where: str) -> dict:
    """{canonical kind: [{"prompt", "answers"}]} of raw[section] (absent or empty: {})."""
    kinds = raw.get(section) or {}
    if not isinstance(kinds, dict):
        raise InputError(f"{section} is {kinds!r}", where, FIX)
    unknown = sorted(set(kinds) - set(SECTIONS[section]))
    if unknown:
        raise InputError(f"unknown {section} kinds {unknown}", where, f"use {', '.join(SECTIONS[section])}")
    canonical = {}
    for name, entries in kinds.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(f"{section}.{name} is {entries!r}", where, "give a list of {prompt, ground_truth}")
        items = [evaluation_prompt(prompt, entry.get("ground_truth"), f"{where} {section}.{name}")
                 for entry in entries for prompt in _phrasings(entry.get("prompt"))]
        if items:
            canonical[SECTIONS[section][name]] = items
    return canonical


def knowedit_to_rome(raw, case_id: int, where: str, skipped: Counter) -> dict | None:
    """One KnowEdit record checked and mapped (module docstring); None, counted in `skipped` under
    "skipped_no_template" or "skipped_unchanged", when it is to be skipped."""
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k].strip()
                                            for k in ("subject", "prompt", "target_new")):
        raise InputError("record lacks a non-empty subject, prompt or target_new string", where, FIX)
    truth = raw.get("ground_truth")  # None (wiki_recent) or "" (one wiki_counterfact record): no true answer
    truths = answer_list(truth, f"{where} ground_truth") if truth is not None and truth != "" else []
    if "rephrase_prompt" in raw and not isinstance(raw["rephrase_prompt"], str):
        raise InputError(f"rephrase_prompt is {raw['rephrase_prompt']!r}", where, "give a string")
    portability, locality = _section(raw, "portability", where), _section(raw, "locality", where)
    template = template_from_sentence(raw["prompt"], raw["subject"])
    reason = "skipped_no_template" if template is None else "skipped_unchanged" if (
        truths and truths[0].strip() == raw["target_new"].strip()) else None
    if reason:
        skipped[reason] += 1
        return None
    rewrite = {"prompt": template, "subject": raw["subject"], "target_new": {"str": raw["target_new"]}}
    if truths:
        rewrite["target_true"] = {"str": truths[0]}
    record = {"case_id": case_id, "requested_rewrite": rewrite}
    if raw.get("rephrase_prompt"):
        record["paraphrase_prompts"] = [raw["rephrase_prompt"]]
    if portability:
        record["portability_prompts"] = portability
    if locality:
        record["locality_prompts"] = locality
    return record


class KnowEditDataset(Sequence):
    """KnowEdit records of one variant ("zsre", "counterfact", "recent") as ROME-schema records."""

    def __init__(self, variant: str, data_dir=None, size: int | None = None, dataset_file=None):
        path = locate_knowedit(variant, data_dir, dataset_file)
        skipped = Counter({"skipped_no_template": 0, "skipped_unchanged": 0})
        records = [record for i, raw in enumerate(read_json_list(path))
                   if (record := knowedit_to_rome(raw, i, f"{path} record {i}", skipped)) is not None]
        if sum(skipped.values()):
            log.warning("KnowEdit %s: skipped %d records whose prompt lacks the subject (or has braces) and %d whose "
                        "target_new equals the ground truth", path, skipped["skipped_no_template"],
                        skipped["skipped_unchanged"])
        self.source = {"schema": "knowedit", "variant": variant, "paths": [str(path)], **skipped,
                       "records_in_source": len(records),
                       "note": "KnowEdit mapped to the ROME schema (case_id = index in the file); no neighborhood "
                               "prompts: its locality prompts are in locality_prompts"}
        self.records = first_n(records, size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        return self.records[item]
