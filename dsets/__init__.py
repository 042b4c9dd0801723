"""Datasets for editing and evaluation, each found in the data directory or downloaded from the authors."""
from dsets.counterfact import CounterFactDataset, MultiCounterFactDataset
from dsets.download import DatasetNotFound, locate
from dsets.knowns import KnownsDataset
from dsets.snippets import AttributeSnippets, get_tfidf_vectorizer
from dsets.zsre import MENDQADataset

# Exact names only: "cf" must never match "mcf" (a substring test in the references did).
DATASETS = {
    "cf": CounterFactDataset,
    "mcf": MultiCounterFactDataset,
    "zsre": MENDQADataset,
}


def load_records(ds_name: str, data_dir=None, size: int | None = None):
    """The dataset named `ds_name` (a Sequence of edit records with a `.source` dict)."""
    if ds_name not in DATASETS:
        raise ValueError(f"unknown dataset {ds_name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[ds_name](data_dir=data_dir, size=size)

__all__ = ["AttributeSnippets", "CounterFactDataset", "DATASETS", "DatasetNotFound", "KnownsDataset", "MENDQADataset",
           "MultiCounterFactDataset", "get_tfidf_vectorizer", "load_records", "locate"]
