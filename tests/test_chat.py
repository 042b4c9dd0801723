"""--chat_template: prompts become the user turn with the generation prompt; a tokenizer without a chat template
is one clear error; every evaluation prompt of a record is wrapped once."""
import copy

import pytest

from experiments.metrics.chat import chat_prompt, with_chat_template
from util.errors import InputError

GENERATION_PROMPT = "<|im_start|>assistant\n"


def test_chat_prompt_is_the_user_turn_before_the_generation_prompt(embedded_tokenizer):
    text = chat_prompt(embedded_tokenizer, "Where is the Eiffel Tower?")
    assert text.endswith("<|im_start|>user\nWhere is the Eiffel Tower?<|im_end|>\n" + GENERATION_PROMPT)


def test_a_tokenizer_without_chat_template_is_an_input_error(embedded_tokenizer):
    plain = copy.deepcopy(embedded_tokenizer)
    plain.chat_template = None  # as GPT-2's tokenizer
    with pytest.raises(InputError, match="has no chat template in --chat_template: leave --chat_template off"):
        chat_prompt(plain, "Hi")


class BosTokenizer:
    """A Llama-3-like tokenizer: its template writes the BOS, and `adds_bos` says whether tokenizing adds one."""

    chat_template, bos_token, bos_token_id, name_or_path = "...", "<s>", 1, "llama-like"

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "<s>[user] " + messages[0]["content"] + " [assistant] "

    def __call__(self, text):
        return {"input_ids": [self.bos_token_id] * self.adds_bos + [ord(c) for c in text]}


def test_a_template_that_writes_the_bos_does_not_get_a_second_one():
    assert chat_prompt(BosTokenizer(adds_bos=True), "Hi") == "[user] Hi [assistant] "
    assert chat_prompt(BosTokenizer(adds_bos=False), "Hi") == "<s>[user] Hi [assistant] "


def test_with_chat_template_wraps_every_evaluation_prompt_once(embedded_tokenizer):
    tok = embedded_tokenizer
    record = {
        "case_id": 4,
        "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                              "target_new": {"str": "Paris"}},
        "paraphrase_prompts": ["Spike Hughes is native to"],
        "neighborhood_prompts": ["Max Mosley originates from",
                                 {"prompt": "nq question: who wrote hamlet", "target": "x"}],
        "generation_prompts": ["Spike Hughes currently lives in"],
        "portability_prompts": {"one_hop": [{"prompt": "What food is it known for?", "answers": ["cheesesteaks"]}]},
        "locality_prompts": {"relation_specificity": [{"prompt": "What is Spike Hughes?", "answers": ["human"]}]},
    }
    original = copy.deepcopy(record)
    wrapped = with_chat_template(record, tok)
    assert record == original
    rewrite = wrapped["requested_rewrite"]["prompt"]
    assert rewrite == chat_prompt(tok, "{} originates from") and rewrite.count("{}") == 1
    assert wrapped["paraphrase_prompts"] == [chat_prompt(tok, "Spike Hughes is native to")]
    question = chat_prompt(tok, "nq question: who wrote hamlet?")  # "?" appended before wrapping
    assert wrapped["neighborhood_prompts"] == [chat_prompt(tok, "Max Mosley originates from"),
                                               {"prompt": question, "target": "x"}]
    assert wrapped["portability_prompts"]["one_hop"][0] == {"prompt": chat_prompt(tok, "What food is it known for?"),
                                                            "answers": ["cheesesteaks"]}
    assert wrapped["locality_prompts"]["relation_specificity"][0]["prompt"] == chat_prompt(tok, "What is Spike Hughes?")
    assert wrapped["generation_prompts"] == record["generation_prompts"]
    assert wrapped["chat_template"] is True
    with pytest.raises(ValueError, match="case_id 4.*already"):
        with_chat_template(wrapped, tok)
