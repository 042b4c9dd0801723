"""Model loading: the embedded GGUF alias (converted once, then cached), local directories, tokenizer set-up."""
import time

import torch

from tests.conftest import make_tiny_model
from util import models
from util.models import EMBEDDED_ALIAS, load_model, model_identity


def test_embedded_model_loads_offline_from_the_converted_copy(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"
    model_id, revision = model_identity(model)
    assert model_id == EMBEDDED_ALIAS
    assert revision == (models.embedded_model_dir() / "SOURCE_SHA256").read_text().strip() and len(revision) == 64
    started = time.perf_counter()
    models.embedded_model_dir()  # a second call finds the cached copy instead of converting the GGUF again
    assert time.perf_counter() - started < 1.0


def test_embedded_model_knows_a_fact(smollm):
    model, tok = smollm
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax().item()
    assert tok.decode(next_token).strip() == "Paris"


def test_local_directory_loads_and_is_identified_by_its_files(tmp_path, embedded_tokenizer):
    tiny = make_tiny_model("gpt2", embedded_tokenizer)
    tiny.save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values()))
    model_id, revision = model_identity(model)
    assert model_id == str(tmp_path.resolve()) and revision.startswith("local:")


def test_unnamed_models_get_distinct_identities(embedded_tokenizer):
    first = model_identity(make_tiny_model("llama", embedded_tokenizer, seed=0))
    second = model_identity(make_tiny_model("llama", embedded_tokenizer, seed=1))
    assert first != second and first[1].startswith("weights:")


def test_bad_dtype_is_a_clear_error():
    try:
        load_model(EMBEDDED_ALIAS, dtype="float8")
    except ValueError as e:
        assert "float32" in str(e)
    else:
        raise AssertionError("no error for an unknown dtype")
