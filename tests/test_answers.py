"""Generation-based success (SPEC §11): normalisation, where an answer ends, prefix matching, and batched greedy
decoding that equals one-prompt-at-a-time decoding."""
import pytest
import torch

from experiments.metrics.answers import (
    answer_complete, answer_text, default_max_new_tokens, generation_success, greedy_continuations, match_decided,
    normalize_answer, prefix_match,
)
from tests.conftest import make_tiny_model
from tests.fake_lm import FILLER, ScriptedLM, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and THE end.", "apple pear and end"),
    ("U.S.A.", "usa"),
    ("Franche-Comté", "franchecomté"),
    ("\u201cParis\u201d \u2014 France", "paris france"),  # Unicode quotes and dash are punctuation too
    ("Theater anthem", "theater anthem"),  # articles only as whole words
    ("  \n ", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("continuation, answer, complete", [
    (" Paris. It is big", "Paris", True),
    ("\n\nParis\nQ: next", "Paris", True),  # newlines before the answer starts do not end it
    (" the U.S. Army. Then", "the U.S. Army", True),  # a period after a one-letter word is not a sentence end
    (" J. K. Rowling wrote it", "J. K. Rowling wrote it", False),
    (" St. Petersburg, Russia. It", "St. Petersburg, Russia", True),
    (" 3.5 million people", "3.5 million people", False),
    (" Paris.", "Paris.", False),  # no character after the period yet: the sentence may go on
    (" Yes! And more", "Yes", True),
    (" Who? Me", "Who", True),
    ("", "", False),
])
def test_answer_text_and_completeness(continuation, answer, complete):
    assert answer_text(continuation) == answer
    assert answer_complete(continuation) is complete


@pytest.mark.parametrize("answer, targets, expected", [
    ("Paris, France", "Paris", True),
    ("Parisian food", "Paris", False),  # word boundary
    ("The Paris of the East", "paris", True),
    ("New", "New York", False),
    ("", "Paris", False),
    ("anything", "", False),  # an empty target matches nothing
    ("anything", "The", False),  # nor does one that normalises to nothing
    ("New York City is big", ["Big Apple", "New York City"], True),
    ("the Soviet Union.", [["USSR", "Soviet Union"], ["CCCP"]], True),  # KnowEdit's alias lists
    ("CCCP", [["USSR", "Soviet Union"], ["CCCP"]], True),
    ("Russia", [["USSR", "Soviet Union"], ["CCCP"]], False),
])
def test_prefix_match(answer, targets, expected):
    assert prefix_match(answer, targets) is expected


def test_default_max_new_tokens_is_16_or_the_longest_target_plus_8(embedded_tokenizer):
    tok = embedded_tokenizer
    long = "Crimean Art College named after M. S. Samokysh in Simferopol, Autonomous Republic of Crimea"
    n_long = len(tok(" " + long, add_special_tokens=False)["input_ids"])
    assert n_long + 8 > 16
    assert default_max_new_tokens(tok, "Paris") == 16
    assert default_max_new_tokens(tok, ["Paris", [long]]) == n_long + 8


@pytest.mark.parametrize("continuation, targets, decided", [
    (" the Italian", "Ferrari", False),  # "the" is an article: nothing is known yet
    (" the Italian team", "Ferrari", True),  # "Italian" is complete and is not "Ferrari"
    (" Ferrari", "Ferrari", False),  # may still become "Ferrarian"
    (" Ferrari is", "Ferrari", True),
    (" New York", "New York City", False),
    (" New Jersey is", "New York City", True),
    (" Th", "The Beatles", False),
    (" Paris. It", ["Lyon", "Paris"], True),  # the answer is complete
    (" Paris is", ["Paris", "Paris Saint-Germain"], False),  # the longer alias is still open
])
def test_match_decided(continuation, targets, decided):
    assert match_decided(continuation, targets) is decided


def test_a_decided_match_never_changes_as_the_text_grows():
    texts = [" the Italian team of Ferrari.", " Ferrari, the car maker", " The Beatles were", " New York City, USA",
             " Parisian food. Paris"]
    targets = ["Ferrari", "The Beatles", "New York City", "Paris", ["New York", "Ferrari"]]
    for text in texts:
        for target in targets:
            final = prefix_match(answer_text(text), target)
            for cut in range(len(text) + 1):
                if match_decided(text[:cut], target):
                    assert prefix_match(answer_text(text[:cut]), target) is final, (text[:cut], target)


def reference_continuation(model, tok, prompt: str, limit: int) -> str:
    """One prompt alone, every step a full forward of the whole sequence (no cache, no padding)."""
    ids, generated = tok(prompt)["input_ids"], []
    with torch.no_grad():
        while len(generated) < limit:
            token = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax().item()
            if token == tok.eos_token_id:
                break
            generated.append(token)
            if answer_complete(tok.decode(generated, skip_special_tokens=True)):
                break
    return tok.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_equals_one_prompt_at_a_time(embedded_tokenizer, arch):
    """Prompts of different lengths, a repeated prompt with two limits, rows leaving the batch at different
    steps; the tokenizer's own padding side plays no part."""
    tok = embedded_tokenizer
    model = make_tiny_model(arch, tok)
    prompts = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there lived", "Hi",
               "Danielle Darrieux's mother tongue is"]
    limits = [8, 7, 4, 3, 6]
    expected = [reference_continuation(model, tok, p, n) for p, n in zip(prompts, limits)]
    assert len({len(tok(e, add_special_tokens=False)["input_ids"]) for e in expected}) > 2
    for padding_side in ("left", "right"):
        tok.padding_side = padding_side
        try:
            assert greedy_continuations(model, tok, prompts, limits) == expected
            assert greedy_continuations(model, tok, prompts, limits, batch_size=2) == expected
        finally:
            tok.padding_side = "right"


def test_rows_stop_at_their_answer_end_and_repeated_prompts_run_once(embedded_tokenizer):
    tok = embedded_tokenizer
    model = ScriptedLM(tok, {"The capital of France is": " Paris. It is big", "Hi": " there\nnext line"})
    prompts = ["The capital of France is", "Hi", "The capital of France is", "Unscripted prompt"]
    texts = greedy_continuations(model, tok, prompts, 6)
    assert texts == [" Paris. It", " there\n", " Paris. It", FILLER * 6]
    # 3 distinct prompts; "Hi" ends after 2 tokens, France after 3, the unscripted one runs its 6.
    assert model.rows_run == [3, 3, 2, 1, 1, 1]


def test_generation_success_full_and_decided_answers(embedded_tokenizer):
    tok = embedded_tokenizer
    model = ScriptedLM(tok, {"Who makes it?": " the Italian team of Ferrari.", "Where?": " Paris is in France. Yes",
                             "Silent:": ""})
    prompts = ["Who makes it?", "Where?", "Silent:", "Where?"]
    targets = ["Ferrari", ["Lyon", "Paris"], "x", "Paris is in Spain"]
    full = generation_success(model, tok, prompts, targets)
    assert full == [{"answer": "the Italian team of Ferrari.", "success": False},
                    {"answer": "Paris is in France", "success": True},
                    {"answer": "", "success": False},  # EOS at once: an empty answer matches nothing
                    {"answer": "Paris is in France", "success": False}]
    full_steps = sum(model.rows_run)
    model.rows_run.clear()
    decided = generation_success(model, tok, prompts, targets, full_answers=False)
    assert [r["success"] for r in decided] == [r["success"] for r in full]
    # Each copy of "Where?" ends where its own match is decided.
    assert [r["answer"] for r in decided] == ["the Italian team", "Paris is", "", "Paris is in France"]
    assert sum(model.rows_run) < full_steps


def test_greedy_continuations_rejects_bad_limits(embedded_tokenizer):
    model = ScriptedLM(embedded_tokenizer, {})
    for limits in (0, [3], True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            greedy_continuations(model, embedded_tokenizer, ["a", "b"], limits)


@pytest.mark.real_model
def test_smollm2_batched_greedy_equals_generate_one_prompt_at_a_time(smollm):
    """The real model: the cached, shrinking batch gives what transformers' generate gives for each prompt
    alone (cut where the answer ends), and stopping once decided keeps every success."""
    model, tok = smollm
    prompts = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is",
               "Q: What is the capital of France? A:", "Toko Yasuda, the", "The Eiffel Tower is located in the city of"]
    targets = ["Paris", "French", "Paris", "guitar", "Rome"]
    expected = []
    for prompt in prompts:
        encoded = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        tokens = generated[0, encoded["input_ids"].shape[1]:].tolist()
        tokens = tokens[:tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens
        cut = next((n for n in range(1, len(tokens) + 1) if answer_complete(tok.decode(tokens[:n]))), len(tokens))
        expected.append(tok.decode(tokens[:cut], skip_special_tokens=True))
    assert greedy_continuations(model, tok, prompts, 16) == expected
    full = generation_success(model, tok, prompts, targets)
    assert [r["answer"] for r in full] == [answer_text(text) for text in expected]
    assert [r["success"] for r in generation_success(model, tok, prompts, targets, full_answers=False)] == [
        r["success"] for r in full]
    assert any(r["success"] for r in full) and not all(r["success"] for r in full)
