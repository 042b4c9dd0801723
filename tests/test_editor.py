"""The Editor (SPEC §12) on a tiny random Llama: its own state and nothing shared, requests in EasyEdit's form,
restore bit for bit, the edit-evaluate-restore context manager, hparams in every form, saved state and model."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import algs
from algs import Editor
from algs.requests import as_requests
from tests.test_engine import EDIT_LAYER, EDIT_REQUESTS, editable_model, preference_margin, tiny_hparams
from util.errors import InputError
from util.io import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(corpus, layers=(1, EDIT_LAYER), **overrides) -> dict:
    return tiny_hparams(corpus, list(layers), 100.0, **overrides)


@pytest.fixture(scope="module")
def model(embedded_tokenizer):
    return editable_model("llama", embedded_tokenizer)


def weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_editors_on_two_copies_equal_one_after_the_other_and_share_nothing(model, embedded_tokenizer, corpus,
                                                                               stats_dir):
    tok = embedded_tokenizer
    hp = hparams(corpus, add_prev_edits=True, update_norm_lambda=1.0)
    first, second = (Editor(copy.deepcopy(model), tok, "ENCORE", hp, stats_dir=stats_dir) for _ in range(2))
    interleaved = []
    for request in EDIT_REQUESTS:  # first edits, then second, then first again: S_t must stay each one's own
        first.edit([request])
        interleaved.append(weights(first.model))
    second.edit([EDIT_REQUESTS[0]])
    assert set(first.state.prev_keys_cov) == set(second.state.prev_keys_cov)
    assert all(not torch.equal(first.state.prev_keys_cov[k], second.state.prev_keys_cov[k])
               for k in first.state.prev_keys_cov)  # the first editor's S_t holds both batches
    second.edit([EDIT_REQUESTS[1]])
    assert all(torch.equal(p, interleaved[-1][name]) for name, p in second.model.named_parameters())
    assert first.state is not second.state and first.state.moments.keys() == second.state.moments.keys()
    assert all(a.matrix is not b.matrix for a, b in zip(first.state.moments.values(), second.state.moments.values()))
    third = Editor(copy.deepcopy(model), tok, "ENCORE", hp, stats_dir=stats_dir)
    assert third.state.prev_keys_cov == {} and third.state.templates == {}  # no module-level cache leaks in


def module_containers() -> dict:
    """Every mutable container held at module level in algs/ (a cache would be one), by qualified name."""
    import importlib
    import pkgutil
    from collections.abc import MutableMapping, MutableSequence, MutableSet

    found = {}
    for info in pkgutil.walk_packages(algs.__path__, "algs."):
        for name, value in vars(importlib.import_module(info.name)).items():
            if isinstance(value, (MutableMapping, MutableSequence, MutableSet)) and not name.startswith("__"):
                found[f"{info.name}.{name}"] = value
    return found


def test_no_module_level_caches_in_algs(model, embedded_tokenizer, corpus, stats_dir):
    """Editing leaves every module-level container of algs/ as it was: the state lives in EditState only (the
    WeakKeyDictionaries keyed by model that held C0, S_t and templates before would fail this)."""
    containers = module_containers()

    def contents():
        return {name: (len(value), repr(list(value.items()) if hasattr(value, "items") else list(value)))
                for name, value in containers.items()}

    before = contents()
    editor = Editor(copy.deepcopy(model), embedded_tokenizer, "AlphaEdit",
                    hparams(corpus, nullspace_threshold=1e9, L2=0.01), stats_dir=stats_dir)
    editor.edit(EDIT_REQUESTS[:1])  # the editor (and its model) alive: a weak cache keyed by it would show
    assert contents() == before and editor.state.templates and editor.state.prev_keys_cov


def test_easyedit_form_locates_the_subject_and_names_the_prompt_when_it_cannot():
    [request] = as_requests(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                            subject=["Danielle Darrieux"], ground_truth=["French"])
    assert request == {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                       "target_new": {"str": "English"}, "target_true": {"str": "French"}}
    assert as_requests([{"prompt": "{} is in", "subject": "Paris", "target_new": "France"}])[0]["target_new"] == {
        "str": "France"}
    with pytest.raises(InputError, match=r"the subject 'Albert Camus' is not in the prompt 'The mother tongue of "
                                         r"Danielle Darrieux is' in edit request 0"):
        as_requests(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                    subject=["Albert Camus"])
    with pytest.raises(InputError, match=r"the subject 'Paris' occurs 2 times in the prompt 'Paris, not Paris, is'"):
        as_requests(prompts=["Paris, not Paris, is"], target_new=["Rome"], subject=["Paris"])
    with pytest.raises(InputError, match=r"lists of different lengths"):
        as_requests(prompts=["a b", "c d"], target_new=["x"], subject=["a", "c"])


def test_restore_is_bit_exact_and_edited_restores_to_the_state_before_it(model, embedded_tokenizer, corpus,
                                                                         stats_dir):
    tok = embedded_tokenizer
    original = weights(model)
    editor = Editor(model, tok, "AlphaEdit", hparams(corpus, nullspace_threshold=1e9, L2=0.01), stats_dir=stats_dir)
    editor.edit(EDIT_REQUESTS[:1])
    after_first = weights(model)
    before = preference_margin(model, tok, EDIT_REQUESTS[1])
    with editor.edited(EDIT_REQUESTS[1:]) as report:
        assert preference_margin(model, tok, EDIT_REQUESTS[1]) < before - 1.0
        assert report["batches"][0]["layers"][0]["solver"]["prev_edits"] is True and len(editor.edits) == 2
    assert all(torch.equal(p, after_first[name]) for name, p in model.named_parameters())
    assert len(editor.edits) == 1 and len(editor.state.prev_keys_cov) == 2
    editor.restore()
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())
    assert editor.edits == [] and editor.state.prev_keys_cov == {}


def test_hparams_from_a_name_a_path_a_dict_or_an_object(model, embedded_tokenizer, corpus, tmp_path):
    tok = embedded_tokenizer
    path = tmp_path / "memit.json"
    path.write_text(json.dumps(hparams(corpus)))
    from_path = Editor(model, tok, "MEMIT", path)
    from_dict = Editor(model, tok, "MEMIT", hparams(corpus))
    from_object = Editor(model, tok, "MEMIT", from_dict.hparams)
    assert from_path.hparams == from_dict.hparams == from_object.hparams and from_path.hparams_source == str(path)
    assert Editor(model, tok, "MEMIT-PRUNE", hparams(corpus)).hparams.prune_log_base > 1  # the variant's switch
    shipped = Editor(AutoModelForCausalLM.from_config(_smollm_like(model.config)), tok, "EMMET", "smollm2-135m.json")
    assert shipped.hparams_source.endswith("hparams/EMMET/smollm2-135m.json")
    with pytest.raises(InputError, match="hparams file 'nope.json' not found"):
        Editor(model, tok, "MEMIT", "nope.json")
    with pytest.raises(InputError, match="unknown algorithm 'MEMT'"):
        Editor(model, tok, "MEMT", hparams(corpus))


def _smollm_like(config):
    """A tiny config with SmolLM2's 30 layers, so the shipped smollm2 hparams fit it."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 30
    return config


def test_state_and_model_saved_and_loaded(model, embedded_tokenizer, corpus, stats_dir, tmp_path):
    tok = embedded_tokenizer
    hp = hparams(corpus, add_prev_edits=True)
    editor = Editor(copy.deepcopy(model), tok, "MEMIT", hp, stats_dir=stats_dir)
    editor.edit(EDIT_REQUESTS[:1])
    editor.save_state(tmp_path / "state.safetensors", {"last_batch": "0"})
    editor.edit(EDIT_REQUESTS[1:])
    straight = weights(editor.model)
    resumed = Editor(copy.deepcopy(model), tok, "MEMIT", hp, stats_dir=stats_dir)
    assert resumed.load_state(tmp_path / "state.safetensors") == {"last_batch": "0"}
    assert resumed.edits == editor.edits[:1]
    resumed.edit(EDIT_REQUESTS[1:])
    assert all(torch.equal(p, straight[name]) for name, p in resumed.model.named_parameters())
    editor.save_pretrained(tmp_path / "edited", extra={"note": "two facts"})
    saved = read_json(tmp_path / "edited" / "edits.json")
    assert saved["alg_name"] == "MEMIT" and saved["note"] == "two facts" and len(saved["requested_rewrites"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    assert all(torch.equal(p, straight[name]) for name, p in reloaded.named_parameters())
