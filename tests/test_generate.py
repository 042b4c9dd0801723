"""Generation: left padding gives each row its unpadded continuation, sampling is seeded per row and top-k,
decoding stops at EOS, and the tokenizer is left as it was."""
import math

import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.conftest import TINY_ARCHS, make_tiny_model
from tests.test_metrics import BigramLM as BigramLogits
from tests.test_metrics import ids
from util.generate import generate_greedy, generate_texts

PROMPTS = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there lived"]


class BigramLM(PreTrainedModel, GenerationMixin):
    """test_metrics' bigram logits as a transformers model: util.generate decodes through model.generate."""

    config_class = PretrainedConfig

    def __init__(self, vocab_size: int, boosts: dict):
        super().__init__(PretrainedConfig(vocab_size=vocab_size, num_hidden_layers=1))  # generate sizes its cache
        self.bigram = BigramLogits(vocab_size, boosts)

    def forward(self, input_ids, attention_mask=None, **unused):
        return CausalLMOutputWithPast(logits=self.bigram(input_ids).logits)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch_continues_like_single_prompts(embedded_tokenizer, arch):
    tok = embedded_tokenizer
    model = make_tiny_model(arch, tok)
    batched = generate_greedy(model, tok, PROMPTS, max_new_tokens=8)
    single = [generate_greedy(model, tok, [prompt], max_new_tokens=8)[0] for prompt in PROMPTS]
    assert batched == single
    assert all(text.startswith(prompt) and len(text) > len(prompt) for text, prompt in zip(batched, PROMPTS))
    assert tok.padding_side == "right"


def test_greedy_matches_argmax_of_full_forwards(embedded_tokenizer):
    """Independent of the KV cache: re-run the whole sequence for every new token."""
    tok = embedded_tokenizer
    model = make_tiny_model("llama", tok)
    sequence = ids(tok, PROMPTS[0])
    with torch.no_grad():
        for _ in range(5):
            sequence.append(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax().item())
    assert generate_greedy(model, tok, PROMPTS[:2], max_new_tokens=5)[0] == tok.decode(sequence,
                                                                                      skip_special_tokens=True)


def test_sampling_is_seeded_per_row(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("gpt2", tok)
    torch.manual_seed(1)
    first = generate_texts(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=11)
    torch.manual_seed(2)  # the global RNG plays no part
    again = generate_texts(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=11, batch_size=1)
    other_seed = generate_texts(model, tok, PROMPTS, n_per_prompt=2, max_new_tokens=6, seed=12)
    assert first == again
    assert first != other_seed
    assert len(first) == 6 and all(first[2 * i + j].startswith(p) for i, p in enumerate(PROMPTS) for j in (0, 1))
    assert tok.padding_side == "right"


def test_top_k_one_is_greedy(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("gpt_neox", tok)
    assert generate_texts(model, tok, PROMPTS, max_new_tokens=6, top_k=1, seed=4) == \
        generate_greedy(model, tok, PROMPTS, max_new_tokens=6)


def test_top_k_samples_only_the_k_most_likely(embedded_tokenizer):
    tok = embedded_tokenizer
    last = ids(tok, "Hello")[-1]
    first, second, third = (ids(tok, word, special=False)[0] for word in (" red", " green", " blue"))
    model = BigramLM(len(tok), {(last, first): 9.0, (last, second): 9.0 - math.log(2), (last, third): 8.0})
    texts = generate_texts(model, tok, ["Hello"], n_per_prompt=60, max_new_tokens=1, top_k=2, seed=0)
    counts = {word: texts.count("Hello" + word) for word in (" red", " green", " blue")}
    assert counts[" blue"] == 0 and counts[" red"] + counts[" green"] == 60
    assert 25 <= counts[" red"] <= 55  # p(red) = 2/3 within the top 2


def test_decoding_stops_at_eos(embedded_tokenizer):
    tok = embedded_tokenizer
    hello, goodbye = ids(tok, "Hello")[-1], ids(tok, "Goodbye")[-1]
    x, y = ids(tok, " there", special=False)[0], ids(tok, " again", special=False)[0]
    eos = tok.eos_token_id
    # Were decoding to go on after EOS, " there" would follow it again.
    model = BigramLM(len(tok), {(hello, x): 10.0, (x, eos): 10.0, (eos, x): 10.0, (goodbye, y): 10.0, (y, y): 10.0})
    texts = generate_greedy(model, tok, ["Hello", "Goodbye"], max_new_tokens=4)
    assert texts == ["Hello there", "Goodbye again again again again"]
