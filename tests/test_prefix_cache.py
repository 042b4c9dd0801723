"""The prefix-cached target optimisation equals the baseline (every token of every row at every step), on
every tiny architecture, with requests that stop at different steps and a subject at the first token."""
import pytest
import torch

from algs import get_algorithm, keyvals
from tests.test_engine import EDIT_LAYER, EDIT_REQUESTS, N_LAYER, TEMPLATE_LENGTHS, editable_model, tiny_hparams
from util.arch import module_names

pytestmark = pytest.mark.usefixtures("one_thread")


REQUESTS = EDIT_REQUESTS + [
    {"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "Rome"}},  # subject at token 0
    {"prompt": "The favourite food of {}", "subject": "Marie Curie", "target_new": {"str": "bread and butter"}},
]


def hparams(**overrides):
    data = {"layers": [EDIT_LAYER], "v_num_grad_steps": 12, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
            "v_weight_decay": 1e-3, "clamp_norm_factor": 10.0, "kl_factor": 0.0625,
            "context_template_length_params": TEMPLATE_LENGTHS, "mom2_dataset": "unused"}
    return get_algorithm("MEMIT")[0].from_dict({**data, **overrides})


@pytest.mark.parametrize("kl_factor", [0.0625, 0.0])  # without KL some requests stop early and leave the batch
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_prefix_cache_gives_the_baseline_targets(arch, kl_factor, embedded_tokenizer):
    tok = embedded_tokenizer
    model = editable_model(arch, tok)
    block = module_names(model).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    hp = hparams(kl_factor=kl_factor)
    baseline = keyvals._optimise_targets(model, tok, block, REQUESTS, templates, hp, prefix_cache=False)
    cached = keyvals._optimise_targets(model, tok, block, REQUESTS, templates, hp, prefix_cache=True)
    assert torch.isfinite(cached.targets).all()
    relative = ((cached.targets - baseline.targets).norm(dim=1) / baseline.targets.norm(dim=1)).max().item()
    assert relative < 1e-5, relative
    assert torch.allclose(cached.initial, baseline.initial, rtol=1e-5, atol=1e-6)
    for a, b in zip(baseline.info, cached.info):
        assert a["updates"] == b["updates"] and a.get("stopped_by") == b.get("stopped_by")
        assert a["first_argmax_step"] == b["first_argmax_step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    if kl_factor == 0 and arch == "gpt2":  # here two requests reach the early stop: their rows leave the batch
        assert sorted(info["updates"] for info in baseline.info)[:2] < [hp.v_num_grad_steps - 1] * 2


def test_the_optimised_vector_changes_the_prediction(embedded_tokenizer):
    """A cached path that dropped the vector would leave the targets at their initial values."""
    tok = embedded_tokenizer
    model = editable_model("gpt2", tok)
    block = module_names(model).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    result = keyvals._optimise_targets(model, tok, block, REQUESTS, templates, hparams(kl_factor=0.0),
                                       prefix_cache=True)
    assert [info["stopped_by"] for info in result.info[:2]] == ["loss", "loss"]  # NLL driven below 5e-2
    assert ((result.targets - result.initial).norm(dim=1) > 0).all()


def test_edit_through_either_path_writes_the_same_update(embedded_tokenizer, tmp_path):
    """apply_*(..., prefix_cache=False) is the baseline switch; both give the same Δ, and the report times
    each phase of the edit."""
    from algs import Editor
    from algs.distribute import orig_weights
    from tests.test_engine import EDIT_REQUESTS

    tok = embedded_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"word{(i * 7 + j) % 97} and text {j}." for j in range(20))
                                  for i in range(60)))
    model = editable_model("llama", tok)
    hp = get_algorithm("EMMET")[0].from_dict(
        tiny_hparams(corpus, [EDIT_LAYER], 100.0, dynamic_multiplier=4))
    original = orig_weights(model, hp)
    deltas = {}
    for cached in (False, True):
        editor = Editor(model, tok, "EMMET", hp, stats_dir=tmp_path / "stats", prefix_cache=cached)
        with editor.edited(EDIT_REQUESTS) as report:
            deltas[cached] = {name: w - original[name] for name, w in orig_weights(model, hp).items()}
        assert all(torch.equal(w, original[name]) for name, w in orig_weights(model, hp).items())
        phases = report["batches"][0]["phase_seconds"]
        assert set(phases) == {"templates", "statistics", "targets", "keys", "solve"}
        assert phases["targets"] > 0 and sum(phases.values()) <= report["batches"][0]["seconds"] + 1e-3
    for name, delta in deltas[False].items():
        assert (deltas[True][name] - delta).norm() <= 1e-4 * delta.norm()
