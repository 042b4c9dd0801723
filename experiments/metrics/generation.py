"""CounterFact generation metrics (SPEC §6): fluency GE and consistency RS of top-k sampled texts.

Fluency follows the ROME reference (`compute_n_gram_entropy`): for one text, H_n = −Σ f log2 f over the
frequencies of its word n-grams; the text's score is the arithmetic MEAN of (2/3)·H2 and (4/3)·H3, i.e.
(H2 + 2·H3) / 3; GE is the mean over texts. (SPEC §6 writes the weighted sum (2/3)·H2 + (4/3)·H3, twice
as large; the published ≈ 626 for GPT-2 XL, ×100, is on the reference's scale, which is used here.)

Consistency RS: tf-idf cosine between the generated texts joined by spaces and the joined Wikipedia
snippets of OTHER subjects that truly have target_new for this relation.
"""
import math
from collections import Counter
from dataclasses import dataclass

import nltk
import numpy as np
import scipy.sparse
from nltk.tokenize import TreebankWordTokenizer

from experiments.metrics.counterfact import record_field, string_list
from util.generate import generate_texts

NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def word_tokenizer():
    """(name, tokenize). nltk.word_tokenize needs the punkt data; without it, nltk's data-free Treebank
    tokenizer splits words the same way within a sentence (a period inside the text stays on its word)."""
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "nltk.word_tokenize", nltk.word_tokenize
    except LookupError:
        return "nltk.TreebankWordTokenizer", TreebankWordTokenizer().tokenize


def ngram_entropy_bits(words: list[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the word n-grams of one text (0 with no n-grams)."""
    counts = Counter(zip(*(words[i:] for i in range(n))))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str, tokenize) -> float:
    """The reference's fluency of one text: mean over n of weight_n · H_n."""
    words = tokenize(text)
    weighted = [weight * ngram_entropy_bits(words, n) for n, weight in NGRAM_WEIGHTS.items()]
    return sum(weighted) / len(weighted)


def ngram_entropy(texts: list[str], tokenize) -> float:
    """GE of one case: mean fluency over its generated texts."""
    if not texts:
        raise ValueError("ngram_entropy of no texts")
    return sum(text_ngram_entropy(t, tokenize) for t in texts) / len(texts)


def tfidf_cosine(text_a: str, text_b: str, vectorizer) -> float:
    """Cosine of the tf-idf vectors of two texts; 0 when either has no word in the vectorizer's vocabulary."""
    encoded = vectorizer.transform([text_a, text_b])
    dense = np.asarray(encoded.toarray() if scipy.sparse.issparse(encoded) else encoded, dtype=np.float64)
    norms = np.linalg.norm(dense, axis=1)
    if (norms == 0).any():
        return 0.0
    return float(dense[0] @ dense[1] / (norms[0] * norms[1]))


def reference_texts(snippets, relation_id, target_id, subject: str) -> list[str]:
    """Texts of snippets[relation_id][target_id] whose subject ("name") is not this case's subject."""
    try:
        entries = snippets[relation_id][target_id]
    except KeyError:
        return []
    return [entry["text"] for entry in entries if entry["name"] != subject]


def generation_metrics(model, tok, record: dict, snippets=None, vectorizer=None, seed=0, max_new_tokens=100,
                       top_k=5) -> dict:
    """Texts from the record's generation_prompts with their fluency, and RS when snippets and a
    vectorizer are given and name references for this case; otherwise a reason for what was skipped."""
    if not record.get("generation_prompts"):
        return {"skipped": "record has no generation_prompts"}
    texts = generate_texts(model, tok, string_list(record, "generation_prompts"), n_per_prompt=1,
                           max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
    tokenizer_name, tokenize = word_tokenizer()
    result = {
        "texts": texts,
        "ngram_entropy": ngram_entropy(texts, tokenize),
        "word_tokenizer": tokenizer_name,
        "sampling": {"seed": seed, "top_k": top_k, "max_new_tokens": max_new_tokens},
    }
    rewrite = record_field(record, "requested_rewrite")
    if snippets is None or vectorizer is None:
        result["skipped_reference_score"] = "no attribute snippets or tf-idf vectorizer given"
    elif "relation_id" not in rewrite or "id" not in rewrite.get("target_new", {}):
        result["skipped_reference_score"] = "record has no requested_rewrite.relation_id or target_new.id"
    else:
        relation_id, target_id = rewrite["relation_id"], rewrite["target_new"]["id"]
        subject = record_field(record, "requested_rewrite", "subject")
        references = reference_texts(snippets, relation_id, target_id, subject)
        if references:
            result["reference_score"] = tfidf_cosine(" ".join(texts), " ".join(references), vectorizer)
            result["reference_snippet_count"] = len(references)
        else:
            result["skipped_reference_score"] = (
                f"no snippets of other subjects for relation {relation_id!r}, target {target_id!r}")
    return result


@dataclass(frozen=True)
class GenerationSettings:
    """What `counterfact_case_metrics(..., generation=...)` needs to add the generation entry."""

    snippets: object = None
    vectorizer: object = None
    seed: int = 0
    max_new_tokens: int = 100
    top_k: int = 5

    def evaluate(self, model, tok, record: dict) -> dict:
        return generation_metrics(model, tok, record, snippets=self.snippets, vectorizer=self.vectorizer,
                                  seed=self.seed, max_new_tokens=self.max_new_tokens, top_k=self.top_k)
