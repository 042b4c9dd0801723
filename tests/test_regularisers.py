"""PRUNE and RECT (SPEC §8) by hand on small numbers, their switches off, and a resumed sequential PRUNE run.

Their effect inside whole sequential edits, against dense formulas, is in test_formulas.py.
"""
import copy
import math

import pytest
import torch

from algs import Editor, algorithm
from algs.regularisers import prune_singular_values, rect_filter
from tests.test_engine import EDIT_REQUESTS, editable_model, tiny_hparams
from util.arch import get_module, module_names

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
BATCHES = [EDIT_REQUESTS[:1], EDIT_REQUESTS[1:]]


# ---------------------------------------------------------------- PRUNE's F by hand

def test_prune_keeps_values_up_to_sigma_max_and_restrains_those_above():
    sigma_max = 2.0
    values = torch.tensor([0.5, 2.0, 2.0 * math.e, math.e ** 3], dtype=F64)
    # α = e: F(σ) = ln σ − ln 2 + 2; F(2e) = 1 + 2, F(e³) = 3 − ln 2 + 2
    natural = prune_singular_values(values, sigma_max, math.e)
    assert natural.tolist() == pytest.approx([0.5, 2.0, 3.0, 5.0 - math.log(2.0)], abs=1e-14)
    # α = 10: F(σ) = log10 σ − log10 2 + 2; F(2e) = log10 e + 2, F(e³) = 3 log10 e − log10 2 + 2
    decimal = prune_singular_values(values, sigma_max, 10.0)
    assert decimal.tolist() == pytest.approx([0.5, 2.0, math.log10(math.e) + 2.0,
                                              3 * math.log10(math.e) - math.log10(2.0) + 2.0], abs=1e-14)
    assert decimal[2:].tolist() == pytest.approx([2.4342944819032518, 3.0018534500457740], abs=1e-14)
    # values at or below σ_max are returned bit for bit
    assert torch.equal(natural[:2], values[:2]) and torch.equal(decimal[:2], values[:2])


def test_prune_is_continuous_and_increasing_at_sigma_max():
    sigma_max = 3.0
    for base in (math.e, 10.0):
        for eps in (1e-3, 1e-6, 1e-9):
            above = prune_singular_values(torch.tensor([sigma_max + eps], dtype=F64), sigma_max, base).item()
            # F(σ_max + ε) = σ_max + ε / (σ_max ln α) + O(ε²)
            assert above == pytest.approx(sigma_max + eps / (sigma_max * math.log(base)), rel=0, abs=eps ** 2)
        grid = torch.linspace(0.1, 50.0, 500, dtype=F64)
        restrained = prune_singular_values(grid, sigma_max, base)
        assert (restrained.diff() > 0).all()  # order of the singular values kept
        assert (restrained[grid > sigma_max] < grid[grid > sigma_max]).all()  # σ_max ≥ 1/ln α: a restraint


def test_prune_rejects_a_base_of_one_or_less():
    with pytest.raises(ValueError, match="prune_log_base"):
        prune_singular_values(torch.tensor([1.0]), 0.5, 1.0)


# ---------------------------------------------------------------- RECT by hand

def rect_case(rows=8, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, cols, generator=g, dtype=F64)
    weight = torch.randn(rows, cols, generator=g, dtype=F64)  # no zeros, no ties in |Δ|/|W|
    return delta, weight


@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.3, 0.25, 1.0])
def test_rect_keeps_exactly_the_top_fraction_by_relative_change(fraction):
    delta, weight = rect_case()
    expected = math.ceil(fraction * delta.numel())  # 0.3 · 128 = 38.4 -> 39; 0.25 · 128 = 32
    filtered, kept = rect_filter(delta, weight, fraction)
    assert kept == expected == int((filtered != 0).sum())
    relative = (delta.abs() / weight.abs()).flatten()
    top = set(torch.argsort(relative, descending=True)[:expected].tolist())
    assert set(torch.nonzero(filtered.flatten()).flatten().tolist()) == top
    mask = filtered != 0
    assert torch.equal(filtered[mask], delta[mask])  # kept entries unchanged


def test_rect_ranks_by_relative_not_absolute_change():
    delta = torch.tensor([[10.0, 1.0], [0.5, 0.1]], dtype=F64)
    weight = torch.tensor([[1000.0, 1.0], [0.01, 1.0]], dtype=F64)  # relative: 0.01, 1, 50, 0.1
    filtered, kept = rect_filter(delta, weight, 0.5)
    assert kept == 2
    assert filtered.tolist() == [[0.0, 1.0], [0.5, 0.0]]  # the largest |Δ| (10) is dropped


def test_rect_count_is_exact_when_fraction_times_numel_is_an_integer():
    delta, weight = rect_case(10, 10)
    assert rect_filter(delta, weight, 0.07)[1] == 7


# ---------------------------------------------------------------- whole edits

def hparams(corpus, layers=(1, 2), **overrides) -> dict:
    return tiny_hparams(corpus, list(layers), 1.0, **overrides)


@pytest.fixture(scope="module")
def model(embedded_tokenizer):
    return editable_model("gpt2", embedded_tokenizer)


def edited_weights(editor) -> dict:
    hp = editor.hparams
    return {layer: get_module(editor.model, module_names(editor.model).rewrite_module_tmp.format(layer)).weight
            .detach().clone() for layer in hp.layers}


def test_switches_off_are_plain_memit_bit_for_bit(model, embedded_tokenizer, corpus, stats_dir):
    tok = embedded_tokenizer
    runs = {}
    for alg, off in (("MEMIT", {}), ("MEMIT-PRUNE", {"prune_log_base": 0}), ("MEMIT-RECT", {"rect_top_fraction": 0}),
                     ("ROME-PRUNE", {"prune_log_base": 0, "layers": [2]}), ("ROME", {"layers": [2]})):
        editor = Editor(copy.deepcopy(model), tok, alg, hparams(corpus, **off), stats_dir=stats_dir)
        assert editor.hparams.prune_log_base == 0 and editor.hparams.rect_top_fraction == 0
        reports = [editor.edit(batch) for batch in BATCHES]
        assert not any("prune" in report for report in reports)
        assert not any("rect_kept" in layer["solver"] for report in reports for b in report["batches"]
                       for layer in b["layers"])
        runs[alg] = {name: p.detach().clone() for name, p in editor.model.named_parameters()}
    for alg, reference in (("MEMIT-PRUNE", "MEMIT"), ("MEMIT-RECT", "MEMIT"), ("ROME-PRUNE", "ROME")):
        assert all(torch.equal(runs[alg][name], runs[reference][name]) for name in runs[reference]), alg
    # and the variants' switches are on by default
    assert algorithm("MEMIT-PRUNE").load_hparams(hparams(corpus)).prune_log_base == math.e
    assert algorithm("MEMIT-RECT").load_hparams(hparams(corpus)).rect_top_fraction > 0


def test_resumed_sequential_prune_run_equals_the_uninterrupted_one(model, embedded_tokenizer, corpus, stats_dir,
                                                                   tmp_path):
    """PRUNE's W_0 (and σ_max(W_0)) is the unedited model's, also after a resume in a fresh Editor."""
    tok = embedded_tokenizer
    data = hparams(corpus)
    straight = Editor(copy.deepcopy(model), tok, "MEMIT-PRUNE", data, stats_dir=stats_dir)
    reports = [straight.edit(batch) for batch in BATCHES]
    assert all(entry["restrained"] > 0 for entry in reports[-1]["prune"].values())  # PRUNE acts in batch 2

    first = Editor(copy.deepcopy(model), tok, "MEMIT-PRUNE", data, stats_dir=stats_dir)
    first.edit(BATCHES[0])
    first.save_state(tmp_path / "state.safetensors")
    resumed = Editor(copy.deepcopy(model), tok, "MEMIT-PRUNE", data, stats_dir=stats_dir)  # a new process
    resumed.load_state(tmp_path / "state.safetensors")
    assert resumed.edits == BATCHES[0]
    report = resumed.edit(BATCHES[1])
    assert report["prune"] == reports[-1]["prune"]  # same σ_max(W_0), same restraint
    for layer, weight in edited_weights(straight).items():
        assert torch.equal(edited_weights(resumed)[layer], weight), layer
    for name, original in straight.state.original_weights.items():  # W_0: the unedited matrices
        assert torch.equal(resumed.state.original_weights[name], original)
        assert torch.equal(original, get_module(model, name).weight)
