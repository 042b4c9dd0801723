"""Reference texts for the consistency metric RS: Wikipedia snippets and the authors' fitted tf-idf statistics.

attribute_snippets.json is a list of {"relation_id", "target_id", "samples": [{"name", "text"}, ...]}:
the samples are articles about subjects `name` whose `relation_id` object truly is `target_id`.
idf.npy + tfidf_vocab.json hold a fitted scikit-learn TfidfVectorizer (default settings); it is rebuilt from
them rather than refitted, so RS uses the same statistics as the references.
"""
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from dsets.download import REMOTE_DSETS, locate, read_json_file, read_json_list

SNIPPETS_FILE = "attribute_snippets.json"
IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"


class AttributeSnippets:
    """relation_id -> target_id -> snippet dicts {"name": subject, "text": article text}."""

    def __init__(self, data_dir=None):
        self.path = locate(SNIPPETS_FILE, data_dir, f"{REMOTE_DSETS}/{SNIPPETS_FILE}")
        self.by_relation = {}
        for i, entry in enumerate(read_json_list(self.path)):
            if not isinstance(entry, dict) or not {"relation_id", "target_id", "samples"} <= entry.keys():
                raise ValueError(f"{self.path} entry {i}: expected keys relation_id, target_id, samples")
            for sample in entry["samples"]:
                if not isinstance(sample, dict) or not {"name", "text"} <= sample.keys():
                    raise ValueError(f"{self.path} entry {i}: each sample needs keys name and text")
                targets = self.by_relation.setdefault(entry["relation_id"], {})
                targets.setdefault(entry["target_id"], []).append(sample)

    def samples(self, relation_id: str, target_id: str) -> list:
        """Snippets about subjects whose `relation_id` is `target_id` (empty when there are none)."""
        return list(self.by_relation.get(relation_id, {}).get(target_id, []))


def read_tfidf_vocab(path) -> dict:
    vocab = read_json_file(path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping each word to its integer column")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: the word columns must be exactly 0..{len(vocab) - 1}, each once")
    return vocab


def read_idf(path, n_words: int) -> np.ndarray:
    idf = np.load(path, allow_pickle=False)
    if idf.ndim != 1 or idf.shape[0] != n_words or not np.issubdtype(idf.dtype, np.floating):
        raise ValueError(f"{path}: expected a 1-D float array of {n_words} idf values (one per vocabulary word), "
                         f"got dtype {idf.dtype} shape {idf.shape}")
    return idf


def get_tfidf_vectorizer(data_dir=None) -> TfidfVectorizer:
    """A ready-to-transform TfidfVectorizer with the stored vocabulary and idf (no fitting)."""
    vocab_path = locate(VOCAB_FILE, data_dir, f"{REMOTE_DSETS}/{VOCAB_FILE}")
    idf_path = locate(IDF_FILE, data_dir, f"{REMOTE_DSETS}/{IDF_FILE}")
    vocab = read_tfidf_vocab(vocab_path)
    vectorizer = TfidfVectorizer(vocabulary=vocab)
    vectorizer.idf_ = read_idf(idf_path, len(vocab))
    return vectorizer
