"""Datasets for editing and evaluation, each found in the data directory or downloaded from the authors."""
from dataclasses import dataclass
from functools import partial

from dsets.counterfact import CounterFactDataset, MultiCounterFactDataset
from dsets.download import DatasetNotFound, locate
from dsets.knowedit import KnowEditDataset
from dsets.knowns import KnownsDataset
from dsets.mquake import MQuAKEDataset
from dsets.snippets import AttributeSnippets, get_tfidf_vectorizer
from dsets.zsre import MENDQADataset
from util.checks import check_request
from util.errors import InputError


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the CLI can run: how to load it, what kind of records it gives (which picks the metrics in
    experiments.metrics), and whether the CounterFact generation tests (fluency, consistency) apply."""

    loader: object  # (data_dir=None, size=None, dataset_file=None) -> a Sequence of records with .source
    kind: str  # "cf": NLL comparisons (ES/PS/NS); "zsre": token accuracy of answers; "mquake": multi-hop questions
    description: str
    generation_tests: bool = False


# Exact names only: "cf" must never match "mcf" (a substring test in the references did).
DATASETS = {
    "cf": DatasetSpec(CounterFactDataset, "cf", "CounterFact", generation_tests=True),
    "mcf": DatasetSpec(MultiCounterFactDataset, "cf", "MEMIT's multi-CounterFact", generation_tests=True),
    "zsre": DatasetSpec(MENDQADataset, "zsre", "zsRE, MEND format, or EasyEdit's zsRE portability files"),
    "knowedit_zsre": DatasetSpec(partial(KnowEditDataset, "zsre"), "zsre", "KnowEdit ZsRE-test-all.json"),
    "knowedit_counterfact": DatasetSpec(partial(KnowEditDataset, "counterfact"), "zsre",
                                        "KnowEdit WikiData-counterfact, test_cf.json or train_cf.json"),
    "knowedit_recent": DatasetSpec(partial(KnowEditDataset, "recent"), "zsre",
                                   "KnowEdit WikiData-recent, recent_test.json or recent_train.json"),
    "mquake": DatasetSpec(MQuAKEDataset, "mquake", "MQuAKE CF-3k-v2, CF or T: a case's edits in one batch, then its "
                                                   "multi-hop questions"),
}


def load_records(ds_name: str, data_dir=None, size: int | None = None, dataset_file=None):
    """The dataset named `ds_name` (a Sequence of edit records with a `.source` dict), every record checked."""
    if ds_name not in DATASETS:
        raise ValueError(f"unknown dataset {ds_name!r}; valid names: {', '.join(sorted(DATASETS))}")
    records = DATASETS[ds_name].loader(data_dir=data_dir, size=size, dataset_file=dataset_file)
    check_records(records, ds_name)
    return records


def check_records(records, ds_name: str) -> None:
    """At least one record, and each one's requested_rewrite a well-formed edit request: a run of a bad
    record would edit the wrong position or nothing, and a run of none would "finish" with no results."""
    where = ", ".join(records.source["paths"])
    if not len(records):
        skipped = records.source.get("skipped_no_template", 0)
        why = f" ({skipped} skipped: the subject is not in the prompt, or it has braces)" if skipped else ""
        raise InputError(f"no usable {ds_name} records{why}", where, "give a dataset with at least one usable record")
    for record in records:
        rewrites = record["requested_rewrite"]
        for rewrite in rewrites if isinstance(rewrites, list) else [rewrites]:
            check_request(rewrite, f"{where} case_id {record['case_id']}")

__all__ = ["AttributeSnippets", "CounterFactDataset", "DATASETS", "DatasetSpec", "KnowEditDataset", "MQuAKEDataset", "DatasetNotFound", "KnownsDataset", "MENDQADataset",
           "MultiCounterFactDataset", "get_tfidf_vectorizer", "load_records", "locate"]
