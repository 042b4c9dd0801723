"""Strict hparams loading (algs.hparams) and every shipped hparams file against the architecture table."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from algs import get_algorithm
from algs.hparams import HparamsError
from algs.memit import MEMITHyperParams
from tests.conftest import make_tiny_model
from util.arch import ARCHITECTURES, MODULE_KEYS, get_module, module_names

HPARAMS_DIR = Path(__file__).resolve().parents[1] / "hparams"
HPARAMS_FILES = sorted(HPARAMS_DIR.glob("*/*.json"))
# File stem -> (model_type, number of layers), from the models' configs (SPEC §5).
MODELS = {
    "gpt2-medium": ("gpt2", 24), "gpt2-large": ("gpt2", 36), "gpt2-xl": ("gpt2", 48),
    "EleutherAI_gpt-j-6B": ("gptj", 28), "llama2-7b": ("llama", 32), "llama3-8b": ("llama", 32),
    "smollm2-135m": ("llama", 30),
}
VALID = {"layers": [5], "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 27, "v_weight_decay": 0.5,
         "clamp_norm_factor": 4, "kl_factor": 0.0625}


def write(tmp_path, data, name="my-hparams.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def load_error(tmp_path, data, cls=MEMITHyperParams) -> str:
    path = write(tmp_path, data)
    with pytest.raises(HparamsError) as error:
        cls.from_json(path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_valid_dict_loads_with_defaults():
    hp = MEMITHyperParams.from_dict({**VALID, "v_lr": 1})  # an int is a valid float
    assert hp.layers == [5] and hp.v_lr == 1 and hp.fact_token == "subject_last" and hp.dynamic is False


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    message = load_error(tmp_path, {**VALID, "v_learning_rate": 0.5})
    assert "v_learning_rate" in message
    assert "valid keys" in message and "'v_lr'" in message and "'clamp_norm_factor'" in message


def test_key_of_another_algorithm_is_unknown_or_inert(tmp_path):
    assert "consistent_keys" in load_error(tmp_path, {**VALID, "consistent_keys": True})  # ROME's switch
    assert "'L2'" in load_error(tmp_path, {**VALID, "L2": 10})  # AlphaEdit's ridge
    emmet, _ = get_algorithm("EMMET")
    assert emmet.from_dict({**VALID, "emmet_lambda": 0.1}).emmet_lambda == 0.1
    # EMMET's ridge in a least-squares file (the ENCORE files have it) changes nothing: accepted, recorded.
    memit = MEMITHyperParams.from_dict({**VALID, "emmet_lambda": 0.1})
    assert memit.inert_keys == {"emmet_lambda": 0.1} and memit.to_dict()["inert_keys"] == {"emmet_lambda": 0.1}


def test_missing_required_key_names_file_and_key(tmp_path):
    data = dict(VALID)
    del data["v_loss_layer"]
    assert "v_loss_layer" in load_error(tmp_path, data)


@pytest.mark.parametrize("key,value", [
    ("layers", "17"), ("layers", 17), ("v_lr", "0.5"), ("v_num_grad_steps", True), ("v_num_grad_steps", 2.5),
    ("v_lr", True), ("dynamic", "true"), ("fact_token", 3), ("rewrite_module_tmp", 5),
])
def test_wrong_type_names_file_and_key(tmp_path, key, value):
    message = load_error(tmp_path, {**VALID, key: value})
    assert repr(key) in message


@pytest.mark.parametrize("key,value", [
    ("layers", ["17"]), ("layers", []), ("layers", [5, 3]), ("fact_token", "subject_middle"),
    ("layer_selection", "random"),
])
def test_bad_values_name_file_and_key(tmp_path, key, value):
    assert key in load_error(tmp_path, {**VALID, key: value})


def test_unreadable_files(tmp_path):
    with pytest.raises(HparamsError, match="not found"):
        MEMITHyperParams.from_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"layers": [5],')
    with pytest.raises(HparamsError, match="not valid JSON") as error:
        MEMITHyperParams.from_json(broken)
    assert str(broken) in str(error.value)
    with pytest.raises(HparamsError, match="JSON object"):
        MEMITHyperParams.from_json(write(tmp_path, [VALID]))


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="ROME"):
        get_algorithm("FASTROME")


@pytest.fixture(scope="module")
def tiny_models(embedded_tokenizer):
    """One 1-layer tiny model per model type: the module names of each file must resolve on it."""
    return {model_type: make_tiny_model(model_type, embedded_tokenizer, n_layer=1)
            for model_type in ("gpt2", "gptj", "llama")}


def test_hparams_files_are_there():
    assert {p.parent.name for p in HPARAMS_FILES} == {"ROME", "MEMIT", "EMMET", "ENCORE", "AlphaEdit"}


@pytest.mark.parametrize("path", HPARAMS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hparams_file_loads_and_names_real_modules(path, tiny_models):
    hparams_class, _ = get_algorithm(path.parent.name)
    hp = hparams_class.from_json(path)
    assert path.stem in MODELS, f"{path}: add its model to MODELS in this test (model_type, layers)"
    model_type, n_layers = MODELS[path.stem]
    assert hp.v_loss_layer == n_layers - 1
    assert max(hp.layers) < n_layers
    table = ARCHITECTURES[model_type]
    named = {key: value for key, value in hp.module_overrides().items() if value is not None}
    assert named == {key: getattr(table, key) for key in named}, f"{path}: module names differ from util/arch.py"
    fake_model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    names = module_names(fake_model, hp.module_overrides())
    tiny = tiny_models[model_type]
    for key in MODULE_KEYS:
        get_module(tiny, getattr(names, key).format(0))
