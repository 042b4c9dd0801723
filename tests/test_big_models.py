"""Big-model placement on the CPU: a model dispatched by Accelerate with a disk-offloaded layer edits exactly as
the plain model; --device_map through the CLI; an offloaded edited layer is refused; bfloat16 edits."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from algs import Editor, get_algorithm
from experiments import evaluate_unified_editing as cli
from tests.cli_workspace import argv_for
from tests.test_engine import EDIT_REQUESTS, editable_model, preference_margin
from util.errors import InputError
from util.io import read_json
from util.models import load_model, parse_device_map

pytestmark = pytest.mark.usefixtures("one_thread")


N_LAYER = 4


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, embedded_tokenizer):
    path = tmp_path_factory.mktemp("llama")
    editable_model("llama", embedded_tokenizer).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 97} x{j}." for j in range(30)) for i in range(80)))
    return path


def hparams(alg, corpus, **overrides):
    data = {"layers": [1], "v_num_grad_steps": 8, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1, "v_weight_decay": 1e-3,
            "clamp_norm_factor": 100.0 if alg == "ROME" else 10.0, "kl_factor": 0.0625,
            "context_template_length_params": [[3, 2]], "mom2_dataset": str(corpus), "dynamic": True,
            "dynamic_multiplier": 4, "mom2_update_weight": 100.0}
    return get_algorithm(alg)[0].from_dict({**data, **overrides})


def layer_map(offloaded: int) -> dict:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i == offloaded else "cpu" for i in range(N_LAYER)})
    return device_map


@pytest.mark.parametrize("alg", ["EMMET", "MEMIT"])
def test_dispatched_model_with_disk_offload_edits_like_the_plain_model(alg, saved_llama, corpus, tmp_path):
    plain, tok = load_model(str(saved_llama))
    dispatched, _ = load_model(str(saved_llama), device_map=layer_map(offloaded=3), offload_folder=str(tmp_path))
    assert dispatched.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    module = "model.layers.1.mlp.down_proj"
    before = plain.get_submodule(module).weight.detach().clone()
    _, apply = get_algorithm(alg)
    for model in (plain, dispatched):
        apply(model, tok, EDIT_REQUESTS, hparams(alg, corpus), stats_dir=tmp_path / f"stats_{id(model)}")
    deltas = [model.get_submodule(module).weight - before for model in (plain, dispatched)]
    assert deltas[0].norm() > 0
    assert torch.allclose(deltas[1], deltas[0], rtol=1e-5, atol=1e-7)
    assert all(preference_margin(dispatched, tok, r) < -1.0 for r in EDIT_REQUESTS)


def test_offloaded_edited_layer_is_one_clear_error(saved_llama, corpus, tmp_path):
    model, tok = load_model(str(saved_llama), device_map=layer_map(offloaded=1), offload_folder=str(tmp_path))
    _, apply = get_algorithm("EMMET")
    with pytest.raises(InputError, match=r"edited layers \[1\] are offloaded"):
        apply(model, tok, EDIT_REQUESTS, hparams("EMMET", corpus), stats_dir=tmp_path / "stats")


def test_device_map_spec_forms(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.0": "cpu"}') == {"model.layers.0": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps({"lm_head": 0}))
    assert parse_device_map(str(tmp_path / "map.json")) == {"lm_head": 0}
    for bad in ("everywhere", "[1, 2]", "{}"):
        with pytest.raises(InputError, match="--device_map"):
            parse_device_map(bad)


def test_cli_device_map_runs_and_refuses_an_offloaded_edit(ws, tmp_path, capsys):
    gpt2_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu",
                **{f"transformer.h.{i}": "disk" if i == 3 else "cpu" for i in range(N_LAYER)}}
    base = ("--dataset_size_limit=2", "--skip_generation_tests")
    assert cli.main(argv_for(ws, tmp_path / "ok", *base, f"--device_map={json.dumps(gpt2_map)}")) == 0
    params = read_json(tmp_path / "ok" / "EMMET" / "run_000" / "params.json")
    assert params["status"] == "finished" and params["args"]["device_map"]["transformer.h.3"] == "disk"
    bad_map = {**gpt2_map, "transformer.h.1": "disk"}  # layer 1 is the edited one (test_cli's EDIT_LAYER)
    assert cli.main(argv_for(ws, tmp_path / "bad", *base, f"--device_map={json.dumps(bad_map)}")) == 2
    err = capsys.readouterr().err
    assert "offloaded" in err and "Traceback" not in err
    assert not list((tmp_path / "bad").glob("*/run_*/case_*.json"))


@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "EMMET", "ENCORE", "AlphaEdit"])
def test_bfloat16_model_on_cpu_edits_with_each_algorithm(alg, saved_llama, corpus, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.bfloat16).eval()
    tok = load_model(str(saved_llama))[1]
    before = [preference_margin(model, tok, r) for r in EDIT_REQUESTS]
    # Tiny keys: the reference ridges (u = 10, L2 = 10) would swamp them; the whole space is "null" for AlphaEdit.
    extra = {"ENCORE": {"update_norm_lambda": 0.01}, "AlphaEdit": {"nullspace_threshold": 1e9, "L2": 0.01}}.get(alg, {})
    report = Editor(model, tok, alg, hparams(alg, corpus, mom2_dtype="bfloat16", **extra),
                    stats_dir=tmp_path / "stats").edit(EDIT_REQUESTS)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16  # cast only at the end
    after = [preference_margin(model, tok, r) for r in EDIT_REQUESTS]
    for b, a in zip(before, after):
        assert a < 0 and b - a > 1.0, (alg, before, after, report["batches"][0]["target_optimisation"])
