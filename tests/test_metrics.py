"""Evaluation metrics against hand-computed answers: NLL scores, ES/PS/NS, EM/PM/NM, harmonic mean,
zsRE token accuracy, n-gram entropy, tf-idf cosine, and the generation entry of a CounterFact case."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from experiments.metrics.counterfact import (counterfact_case_metrics, counterfact_case_scores, harmonic_mean,
                                             score_targets, target_nll)
from experiments.metrics.generation import (GenerationSettings, generation_metrics, ngram_entropy,
                                            ngram_entropy_bits, reference_texts, text_ngram_entropy, tfidf_cosine,
                                            word_tokenizer)
from experiments.metrics.zsre import zsre_case_metrics, zsre_case_scores
from tests.conftest import make_tiny_model


class BigramLM(torch.nn.Module):
    """Next-token logits depend only on the current token: 0 for every token, plus boosts[(current, next)]."""

    def __init__(self, vocab_size: int, boosts: dict):
        super().__init__()
        self.vocab_size = vocab_size
        self.boosts = boosts
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask=None, **unused):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for (current, following), value in self.boosts.items():
            logits[..., following] += (input_ids == current).float() * value
        return SimpleNamespace(logits=logits, past_key_values=None)


def ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_two_token_target_nll_by_hand(embedded_tokenizer):
    tok = embedded_tokenizer
    prefix = "The capital of France is"
    last = ids(tok, prefix)[-1]
    new_york = ids(tok, " New York", special=False)
    assert len(new_york) == 2
    paris = ids(tok, " Paris", special=False)
    vocab = len(tok)
    model = BigramLM(vocab, {(last, new_york[0]): math.log(3), (new_york[0], new_york[1]): math.log(5),
                             (last, paris[0]): math.log(7)})
    nll = target_nll(model, tok, [prefix, prefix], ["New York", "Paris"])
    # After `last`, two logits are boosted (e^logit 3 and 7, the others 1): p(New) = 3 / (vocab - 2 + 3 + 7);
    # after " New" one is: p(York) = 5 / (vocab - 1 + 5).
    expected_new_york = -(math.log(3 / (vocab - 2 + 3 + 7)) + math.log(5 / (vocab - 1 + 5))) / 2
    expected_paris = -math.log(7 / (vocab - 2 + 3 + 7))
    assert nll == pytest.approx([expected_new_york, expected_paris], rel=1e-5)


def single_forward_nll(model, tok, prefix, target):
    """Independent reference: one unpadded forward of prefix ids + target ids."""
    prefix_ids, target_ids = ids(tok, prefix), ids(tok, " " + target, special=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix_ids + target_ids])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    return -sum(log_probs[len(prefix_ids) - 1 + j, t].item() for j, t in enumerate(target_ids)) / len(target_ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_batches_equal_unpadded_single_forwards(embedded_tokenizer, arch):
    tok = embedded_tokenizer
    model = make_tiny_model(arch, tok)
    prefixes = ["The capital of France is", "Hi", "Danielle Darrieux's mother tongue is", "Hi"]
    targets = ["Paris", "New York", "French", "Darrieux"]
    expected = [single_forward_nll(model, tok, p, t) for p, t in zip(prefixes, targets)]
    assert target_nll(model, tok, prefixes, targets) == pytest.approx(expected, abs=1e-5)
    assert target_nll(model, tok, prefixes, targets, batch_size=1) == pytest.approx(expected, abs=1e-5)
    assert target_nll(model, tok, prefixes, targets, batch_size=3) == pytest.approx(expected, abs=1e-5)


def test_score_targets_rejects_mismatched_lists(embedded_tokenizer):
    with pytest.raises(ValueError, match="2 prefixes but 1 targets"):
        score_targets(BigramLM(len(embedded_tokenizer), {}), embedded_tokenizer, ["a", "b"], ["c"])


def counterfact_record(**overrides):
    record = {
        "case_id": 7,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Where is she from? Danielle Darrieux speaks",
                               "Danielle Darrieux is a native speaker of"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of",
                                 "Hi"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
    }
    record.update(overrides)
    return record


def test_counterfact_case_metrics_match_pairwise_nlls(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("llama", tok)
    record = counterfact_record()
    metrics = counterfact_case_metrics(model, tok, record)
    assert set(metrics) == {"rewrite_prompts_nll", "paraphrase_prompts_nll", "neighborhood_prompts_nll"}
    groups = {"rewrite_prompts_nll": ["The mother tongue of Danielle Darrieux is"],
              "paraphrase_prompts_nll": record["paraphrase_prompts"],
              "neighborhood_prompts_nll": record["neighborhood_prompts"]}
    for key, prompts in groups.items():
        assert len(metrics[key]) == len(prompts)
        for prompt, pair in zip(prompts, metrics[key]):
            assert pair["target_new"] == pytest.approx(single_forward_nll(model, tok, prompt, "English"), abs=1e-5)
            assert pair["target_true"] == pytest.approx(single_forward_nll(model, tok, prompt, "French"), abs=1e-5)


def test_counterfact_case_metrics_omit_absent_groups_and_name_missing_fields(embedded_tokenizer):
    tok = embedded_tokenizer
    model = BigramLM(len(tok), {})
    record = counterfact_record()
    del record["paraphrase_prompts"]
    assert "paraphrase_prompts_nll" not in counterfact_case_metrics(model, tok, record)
    del record["requested_rewrite"]["target_true"]
    with pytest.raises(ValueError, match=r"case_id 7.*requested_rewrite\.target_true"):
        counterfact_case_metrics(model, tok, record)


def test_counterfact_case_scores_by_hand():
    e = math.exp
    case = {
        "rewrite_prompts_nll": [{"target_new": 1.0, "target_true": 2.0}],
        "paraphrase_prompts_nll": [{"target_new": 1.0, "target_true": 0.5}, {"target_new": 0.2, "target_true": 3.0}],
        "neighborhood_prompts_nll": [{"target_new": 2.0, "target_true": 1.0}, {"target_new": 1.0, "target_true": 2.0},
                                     {"target_new": 3.0, "target_true": 0.1}],
        "generation": {"ngram_entropy": 5.5, "reference_score": 0.25},
    }
    scores = counterfact_case_scores(case)
    expected = {
        "ES": 1.0, "EM": e(-1) - e(-2),
        "PS": 0.5, "PM": ((e(-1) - e(-0.5)) + (e(-0.2) - e(-3))) / 2,
        "NS": 2 / 3, "NM": ((e(-1) - e(-2)) + (e(-2) - e(-1)) + (e(-0.1) - e(-3))) / 3,
        "GE": 5.5, "RS": 0.25,
    }
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_counterfact_case_scores_leave_absent_groups_out():
    scores = counterfact_case_scores({"rewrite_prompts_nll": [{"target_new": 3.0, "target_true": 2.0}],
                                      "paraphrase_prompts_nll": [], "generation": {"skipped": "no prompts"}})
    assert scores == pytest.approx({"ES": 0.0, "EM": math.exp(-3) - math.exp(-2)})


def test_harmonic_mean_by_hand():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    assert harmonic_mean([0.6]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])


def zsre_record():
    return {
        "case_id": 3,
        "requested_rewrite": {"prompt": "What is the capital of {}?", "subject": "France",
                              "target_new": {"str": "New York"}},
        "paraphrase_prompts": ["France's capital city is"],
        "neighborhood_prompts": [{"prompt": "who wrote hamlet", "target": "Shakespeare"}],
    }


def test_zsre_token_accuracy_on_controlled_model(embedded_tokenizer):
    tok = embedded_tokenizer
    record = zsre_record()
    question_mark = ids(tok, "What is the capital of France?")[-1]
    new, york = ids(tok, " New York", special=False)
    shakespeare = ids(tok, " Shakespeare", special=False)[0]
    hamlet_question = ids(tok, "who wrote hamlet?")
    assert hamlet_question[-1] == question_mark and len({question_mark, new, york, shakespeare}) == 4
    paraphrase_last = ids(tok, record["paraphrase_prompts"][0])[-1]
    other = york + 1
    assert paraphrase_last not in {question_mark, new, york}
    model = BigramLM(len(tok), {
        (question_mark, new): 5.0,  # after "?" the argmax is " New" ...
        (question_mark, shakespeare): 4.0,  # ... then " Shakespeare"
        (new, other): 5.0,  # after " New" the argmax is not " York"
        (paraphrase_last, york): 5.0,  # after "... is" the argmax is " York", not " New"
    })
    metrics = zsre_case_metrics(model, tok, record)
    # The neighborhood question gets "?" appended, so its argmax is " New", not " Shakespeare".
    assert metrics == {"rewrite_prompts_correct": [[True, False]],
                       "paraphrase_prompts_correct": [[False, False]],
                       "neighborhood_prompts_correct": [[False]]}
    model.boosts[(question_mark, shakespeare)] = 6.0
    metrics = zsre_case_metrics(model, tok, record)
    assert metrics["rewrite_prompts_correct"] == [[False, False]]
    assert metrics["neighborhood_prompts_correct"] == [[True]]


def test_zsre_case_scores_by_hand():
    scores = zsre_case_scores({"rewrite_prompts_correct": [[True, False]],
                               "paraphrase_prompts_correct": [[True], [True, True, False]],
                               "neighborhood_prompts_correct": []})
    assert scores == pytest.approx({"ES": 0.5, "PS": 0.75})


def test_ngram_entropy_by_hand():
    split = str.split
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams of a b a b: ab, ba, ab
    assert ngram_entropy_bits(["a", "b", "a", "b"], 2) == pytest.approx(h2)
    assert ngram_entropy_bits(["a", "b", "a", "b"], 3) == pytest.approx(1.0)  # aba, bab
    assert ngram_entropy_bits(["a", "b"], 3) == 0.0
    first = (2 / 3 * h2 + 4 / 3 * 1.0) / 2  # the reference's mean of the weighted entropies
    second = (2 / 3 * 1.0 + 4 / 3 * 0.0) / 2  # a b c: bigrams ab, bc; one trigram
    assert text_ngram_entropy("a b a b", split) == pytest.approx(first)
    assert ngram_entropy(["a b a b", "a b c"], split) == pytest.approx((first + second) / 2)


def test_word_tokenizer_splits_punctuation():
    name, tokenize = word_tokenizer()
    assert name in {"nltk.word_tokenize", "nltk.TreebankWordTokenizer"}
    assert tokenize("Paris, France's capital, is big.") == ["Paris", ",", "France", "'s", "capital", ",", "is",
                                                             "big", "."]


def tiny_vectorizer():
    vectorizer = TfidfVectorizer(vocabulary={"paris": 0, "france": 1, "london": 2})
    vectorizer.idf_ = np.array([1.0, 2.0, 3.0])
    return vectorizer


def test_tfidf_cosine_by_hand():
    vectorizer = tiny_vectorizer()
    # paris paris France -> counts (2, 1, 0) * idf (1, 2, 3) = (2, 2, 0); france london -> (0, 2, 3)
    expected = 4 / (math.sqrt(8) * math.sqrt(13))
    assert tfidf_cosine("paris paris France", "france london", vectorizer) == pytest.approx(expected)
    assert tfidf_cosine("nothing known here", "france london", vectorizer) == 0.0


def test_reference_texts_exclude_the_case_subject():
    snippets = {"P1": {"Q1": [{"name": "A", "text": "a"}, {"name": "Me", "text": "mine"}, {"name": "B", "text": "b"}]}}
    assert reference_texts(snippets, "P1", "Q1", "Me") == ["a", "b"]
    assert reference_texts(snippets, "P1", "Q2", "Me") == []
    assert reference_texts(snippets, "P9", "Q1", "Me") == []


def test_generation_metrics_reference_score_uses_other_subjects(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("gpt2", tok)
    record = counterfact_record(generation_prompts=["Paris is", "In France"])
    snippets = {"P103": {"Q1860": [{"name": "Someone Else", "text": "paris paris france"},
                                   {"name": "Danielle Darrieux", "text": "london london london"}]}}
    vectorizer = tiny_vectorizer()
    result = generation_metrics(model, tok, record, snippets=snippets, vectorizer=vectorizer, seed=3,
                                max_new_tokens=6)
    assert len(result["texts"]) == 2 and result["texts"][0].startswith("Paris is")
    assert result["word_tokenizer"] == word_tokenizer()[0]
    assert result["reference_snippet_count"] == 1
    joined = " ".join(result["texts"])
    assert result["reference_score"] == pytest.approx(tfidf_cosine(joined, "paris paris france", vectorizer))
    assert result["reference_score"] != pytest.approx(
        tfidf_cosine(joined, "paris paris france london london london", vectorizer))
    _, tokenize = word_tokenizer()
    assert result["ngram_entropy"] == pytest.approx(ngram_entropy(result["texts"], tokenize))


def test_generation_metrics_skips_with_reasons(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("gpt2", tok)
    no_prompts = counterfact_record()
    del no_prompts["generation_prompts"]
    assert "skipped" in generation_metrics(model, tok, no_prompts)
    result = generation_metrics(model, tok, counterfact_record(), max_new_tokens=4)
    assert "reference_score" not in result and "snippets" in result["skipped_reference_score"]


def test_case_metrics_carry_the_generation_entry(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("gpt2", tok)
    settings = GenerationSettings(seed=5, max_new_tokens=4)
    metrics = counterfact_case_metrics(model, tok, counterfact_record(), generation=settings)
    assert metrics["generation"]["texts"] == generation_metrics(model, tok, counterfact_record(), seed=5,
                                                                max_new_tokens=4)["texts"]
    assert counterfact_case_scores(metrics)["GE"] == metrics["generation"]["ngram_entropy"]
