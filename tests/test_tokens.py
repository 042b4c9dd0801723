"""Subject positions, padded batches and target tokens on real tokenizers (SPEC §3).

The expected indices are found here by decoding token prefixes, not by the counting that
util.tokens does: the subject's last token is the first prefix of the tokens whose text reaches the end
of the subject; its first token follows the longest token prefix whose text lies inside the prompt prefix.
"""
import pytest
import torch
from transformers import AutoTokenizer, LlamaTokenizer

from tests.conftest import shared_path
from util.models import prepare_tokenizer
from util.tokens import FACT_TOKENS, pad_batch, padded_index, subject_token_index, target_token_ids

CASES = [  # (template, subject): subject at the start, middle and end; one- and multi-token; punctuation
    ("{} is located in", "Danielle Darrieux"),
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("The home city of {}", "Paris"),
    ("{}'s capital city is", "France"),
    ("Where does {} live? In", "Émile Zola"),
    ("Mr. {}, the actor, was born in", "Darrieux"),
    ("In 1990, {} played for the", "Michael Jordan"),
]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(shared_path("tokenizers", "gpt2")))


@pytest.fixture(scope="module")
def llama2_tokenizer():
    """Llama-2 SentencePiece (BOS added; no tokenizer_config.json ships, so add_bos_token is set here)."""
    shared_path("tokenizers", "llama2", "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(shared_path("tokenizers", "llama2"), add_bos_token=True)
    return prepare_tokenizer(tok)


@pytest.fixture(params=["gpt2", "llama2", "embedded"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tokenizer" if request.param != "embedded"
                                   else "embedded_tokenizer")


def test_reference_encodings(gpt2_tokenizer, llama2_tokenizer):
    """The loaders give the documented encodings (shared/tokenizers/README.md), Llama with its BOS."""
    sentence = "The mother tongue of Danielle Darrieux is"
    assert gpt2_tokenizer(sentence)["input_ids"] == [464, 2802, 11880, 286, 39808, 7491, 5034, 2821, 318]
    assert llama2_tokenizer(sentence)["input_ids"] == [1, 450, 5637, 26820, 310, 8432, 280, 7335, 2546, 1314, 338]


def decoded(tok, ids, n):
    return tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def expected_index(tok, template, subject, fact_token):
    prefix, _ = template.split("{}")
    ids = tok(template.format(subject))["input_ids"]
    counts = range(len(ids) + 1)
    n_through_subject = min(n for n in counts if decoded(tok, ids, n).startswith(prefix + subject))
    n_before_subject = max(n for n in counts if prefix.startswith(decoded(tok, ids, n)))
    assert n_before_subject < n_through_subject
    return {"subject_first": n_before_subject, "subject_last": n_through_subject - 1,
            "subject_first_after_last": n_through_subject, "last": len(ids) - 1}[fact_token]


@pytest.mark.parametrize("fact_token", FACT_TOKENS)
@pytest.mark.parametrize("template,subject", CASES)
def test_subject_token_index(tok, template, subject, fact_token):
    ids = tok(template.format(subject))["input_ids"]
    expected = expected_index(tok, template, subject, fact_token)
    if expected == len(ids):  # nothing follows the subject
        with pytest.raises(ValueError, match="nothing follows the subject"):
            subject_token_index(tok, template, subject, fact_token)
        return
    assert subject_token_index(tok, template, subject, fact_token) == expected


def test_subject_last_token_holds_the_subject_end(tok):
    """Spelled out for one case: the subject's last token decodes to the subject's last letters."""
    template, subject = "The mother tongue of {} is", "Danielle Darrieux"
    ids = tok(template.format(subject))["input_ids"]
    index = subject_token_index(tok, template, subject, "subject_last")
    assert "Darrieux".endswith(decoded(tok, ids[index:], 1).strip())
    assert decoded(tok, ids, index + 1).endswith("Danielle Darrieux")
    assert not decoded(tok, ids, index).endswith("Darrieux")


@pytest.mark.parametrize("name", ["gpt2", "llama2", "embedded"])
def test_subject_first_is_not_a_lone_space_token(name, request):
    tok = request.getfixturevalue(f"{name}_tokenizer" if name != "embedded" else "embedded_tokenizer")
    template, subject = "The {} was held in", "2010 World Cup"
    ids = tok(template.format(subject))["input_ids"]
    index = subject_token_index(tok, template, subject, "subject_first")
    assert index == expected_index(tok, template, subject, "subject_first")
    assert decoded(tok, ids[index:], 1).strip().startswith("2")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("fact_token", ["subject_first", "subject_last", "last"])
def test_padded_index_points_at_the_same_token(tok, padding_side, fact_token):
    sequences = [tok(t.format(s))["input_ids"] for t, s in CASES]
    batch = pad_batch(tok, sequences, padding_side)
    width = max(len(s) for s in sequences)
    assert batch["input_ids"].shape == (len(CASES), width)
    for row, ((template, subject), ids) in enumerate(zip(CASES, sequences)):
        pads = width - len(ids)
        real = slice(pads, width) if padding_side == "left" else slice(0, len(ids))
        assert batch["input_ids"][row, real].tolist() == ids
        assert batch["attention_mask"][row].sum().item() == len(ids)
        assert batch["attention_mask"][row, real].all()
        index = expected_index(tok, template, subject, fact_token)
        position = padded_index(subject_token_index(tok, template, subject, fact_token), len(ids), width, padding_side)
        assert batch["input_ids"][row, position].item() == ids[index]
        assert batch["attention_mask"][row, position].item() == 1


def test_padded_index_rejects_unknown_side():
    with pytest.raises(ValueError, match="padding_side"):
        padded_index(0, 3, 5, "middle")


def test_pad_batch_uses_the_pad_token(embedded_tokenizer):
    batch = pad_batch(embedded_tokenizer, [[5, 6, 7], [8]], "left")
    pad = embedded_tokenizer.pad_token_id
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [pad, pad, 8]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))


@pytest.mark.parametrize("target", ["Paris", "English", "Danielle Darrieux", "Émile", "1990"])
def test_target_token_ids(tok, target):
    ids = target_token_ids(tok, target)
    assert ids
    assert ids[0] != tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[0]) != "\u2581"  # no lone SentencePiece space piece
    assert decoded(tok, ids, len(ids)).strip() == target
    assert target_token_ids(tok, f"  {target} ") == ids  # surrounding spaces do not matter


@pytest.mark.parametrize("target", ["Paris", "English", "Danielle Darrieux"])
def test_target_tokens_continue_the_prompt(tok, target):
    """Teacher forcing is exact: prompt tokens + target tokens == tokens of prompt + " " + target."""
    prompt = "The mother tongue of Danielle Darrieux is"
    assert tok(prompt)["input_ids"] + target_token_ids(tok, target) == tok(prompt + " " + target)["input_ids"]


def test_bad_arguments_are_rejected(embedded_tokenizer):
    with pytest.raises(ValueError, match="fact_token"):
        subject_token_index(embedded_tokenizer, "{} is", "Paris", "subject_middle")
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_index(embedded_tokenizer, "Paris is", "Paris")
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_index(embedded_tokenizer, "{} and {}", "Paris")


def test_empty_target_is_rejected(tok):
    """Not silently the lone space token (' ' -> ['Ġ'] / ['▁'])."""
    for target in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            target_token_ids(tok, target)
