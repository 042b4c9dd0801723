"""Each algorithm's update against its paper's formula, written densely in this file (SPEC §1, §2, §8).

Two sequential batches go through `Editor.edit` on a tiny float64 model; beside it a from-scratch reference
edits its own copy of the model: keys from keyvals.compute_keys and targets (z / v*) from
keyvals.compute_targets on the reference model as it is at that point (so what is checked is the solve and
its bookkeeping — spread, S_t, projection, PRUNE, RECT — not the Adam optimisation), C0 from
second_moments_for on the unedited model, and each ΔW from the paper's closed form with explicit d_k × d_k
inverses. Every ΔW the Editor writes must equal the reference's to 1e-8 relative.

Residuals (z − h_L, v* − W k) are formed in float64: keyvals keeps a float64 model's vectors in float64
(test_keyvals_keep_float64_for_a_float64_model), so nothing is rounded to float32 on the way to the solve.

Besides catching a wrong formula these catch, each in at least one test (checked by mutating algs/ locally):
ENCORE without update_norm_lambda, AlphaEdit with λC0 kept under the projection, S_t updated before the solve
(the batch's own keys counted twice), PRUNE's W_0 taken from the model after the first batch.
"""
import copy
import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from algs import Editor, algorithm, keyvals
from algs.distribute import second_moments_for
from tests.test_engine import TEMPLATE_LENGTHS, editable_model, tiny_hparams
from util.arch import get_module, module_names

F64 = torch.float64
TOL = 1e-8
LAMBDA = 100.0  # mom2_update_weight
SPREAD = [1, 2]  # MEMIT-style layers (target at the last)
SINGLE = [2]  # ROME's layer
REQUESTS = [
    {"case_id": 0, "prompt": "The home city of {}", "subject": "Danielle Darrieux",
     "target_new": {"str": "London"}, "target_true": {"str": "Paris"}},
    {"case_id": 1, "prompt": "The mother tongue of {}", "subject": "Albert Camus",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    {"case_id": 2, "prompt": "The favourite food of {}", "subject": "Marie Curie",
     "target_new": {"str": "bread"}, "target_true": {"str": "cheese"}},
]
BATCHES = [REQUESTS[:2], REQUESTS[2:]]  # B = 2 then B = 1 (EMMET: ridge, then none)
pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(a, b) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def base_hparams(corpus, layers, mom2_update_weight=LAMBDA, **overrides) -> dict:
    return tiny_hparams(corpus, layers, mom2_update_weight, **overrides)


@pytest.fixture(scope="module")
def models64(embedded_tokenizer):
    """Tiny random models in float64 (Conv1D and nn.Linear), never edited: tests edit deep copies."""
    return {arch: editable_model(arch, embedded_tokenizer).to(F64) for arch in ("gpt2", "llama")}


# ---------------------------------------------------------------- the dense reference

def out_in(module) -> torch.Tensor:
    """W as (d_out, d_in), float64 copy."""
    weight = module.weight.detach()
    return (weight.T if isinstance(module, Conv1D) else weight).to(F64).clone()


def add_out_in(module, delta) -> None:
    with torch.no_grad():
        module.weight += (delta.T if isinstance(module, Conv1D) else delta).to(module.weight.dtype)


def times_inverse(B, M):
    """B M⁻¹ by a float64 solve (Mᵀ X = Bᵀ), never an explicit inverse."""
    return torch.linalg.solve(M.T, B.T).T


def eye(n):
    return torch.eye(n, dtype=F64)


class DenseReference:
    """The papers' algorithms on a copy of the unedited model, one formula per algorithm."""

    def __init__(self, model, tok, alg, hp, C0: dict):
        self.model, self.tok, self.alg, self.hp = copy.deepcopy(model), tok, alg, hp
        self.names = module_names(self.model)
        self.modules = [self.names.rewrite_module_tmp.format(layer) for layer in hp.layers]
        self.C0 = {name: C0[name].to(F64) for name in self.modules}
        self.W0 = {name: out_in(get_module(self.model, name)) for name in self.modules}
        d_k = {name: self.W0[name].shape[1] for name in self.modules}
        self.S = {name: torch.zeros(d_k[name], d_k[name], dtype=F64) for name in self.modules}  # S_t
        self.templates = keyvals.context_templates(self.model, tok, hp.context_template_length_params, 0,
                                                   flat=alg.startswith("ROME"))

    def weights(self) -> dict:
        return {name: out_in(get_module(self.model, name)) for name in self.modules}

    # -- ΔW of one matrix, from the paper's closed form
    def delta(self, name, K, R, k_constraint=None):
        hp, C0, S = self.hp, self.C0[name], self.S[name]
        d_k = C0.shape[0]
        lam, u = hp.mom2_update_weight, hp.update_norm_lambda
        prev = S if hp.add_prev_edits else torch.zeros_like(S)
        if self.alg.startswith("ROME"):  # Δ = (v − W k_c) (C0⁻¹k*)ᵀ / (k_cᵀ C0⁻¹ k*), λ cancels
            C0inv_k = torch.linalg.solve(C0, K)
            return R @ C0inv_k.T / (k_constraint.T @ C0inv_k)
        if self.alg == "EMMET":  # Δ = R (Kᵀ C0⁻¹ K + emmet_lambda·λ·I)⁻¹ Kᵀ C0⁻¹, no ridge for B = 1
            ridge = hp.emmet_lambda * lam if K.shape[1] > 1 else 0.0
            C0inv_K = torch.linalg.solve(C0, K)  # Kᵀ C0⁻¹ = (C0⁻¹ K)ᵀ, C0 symmetric
            return times_inverse(R, K.T @ C0inv_K + ridge * eye(K.shape[1])) @ C0inv_K.T
        if self.alg == "AlphaEdit":  # Δ = R Kᵀ P⊥ ((S_t + K Kᵀ) P⊥ + L2 I)⁻¹, no λC0
            eigenvalues, eigenvectors = torch.linalg.eigh(C0)
            U = eigenvectors[:, eigenvalues < hp.nullspace_threshold]
            P_perp = U @ U.T
            return times_inverse(R @ K.T @ P_perp, (prev + K @ K.T) @ P_perp + hp.L2 * eye(d_k))
        # MEMIT / ENCORE (and the PRUNE / RECT variants): Δ = R Kᵀ (λC0 + uI + S_t + K Kᵀ)⁻¹
        return times_inverse(R @ K.T, lam * C0 + u * eye(d_k) + prev + K @ K.T)

    def rect(self, delta, W):
        """Keep the ceil(f·numel) entries with the largest |Δ|/|W|, zero the rest."""
        relative = (delta.abs() / W.abs()).flatten()
        keep = torch.zeros_like(relative, dtype=torch.bool)
        keep[torch.argsort(relative, descending=True)[:math.ceil(self.hp.rect_top_fraction * relative.numel())]] = True
        return torch.where(keep.view_as(delta), delta, torch.zeros_like(delta))

    def prune(self, name):
        """W_t = W_0 + U F(Σ) Vᵀ from the SVD of W_t − W_0; F(σ) = log_α σ − log_α σ_max(W_0) + σ_max(W_0) for
        σ > σ_max(W_0), else σ."""
        alpha, W0 = self.hp.prune_log_base, self.W0[name]
        top = torch.linalg.svdvals(W0)[0]
        U, s, Vh = torch.linalg.svd(out_in(get_module(self.model, name)) - W0, full_matrices=False)
        s = torch.where(s > top, torch.log(s) / math.log(alpha) - torch.log(top) / math.log(alpha) + top, s)
        module = get_module(self.model, name)
        new = W0 + U @ torch.diag(s) @ Vh
        with torch.no_grad():
            module.weight.copy_(new.T if isinstance(module, Conv1D) else new)

    # -- one batch
    def edit(self, batch):
        if self.alg.startswith("ROME"):
            for request in batch:  # one rank-one edit per fact, each on the model edited so far
                self._rome([request])
        else:
            self._spread(batch)
        if self.hp.prune_log_base:
            for name in self.modules:
                self.prune(name)

    def _rome(self, batch):
        hp, tok = self.hp, self.tok
        name = self.modules[0]
        module = get_module(self.model, name)
        mlp = self.names.mlp_module_tmp.format(hp.layers[0])
        v = keyvals.compute_targets(self.model, tok, mlp, batch, self.templates, hp).targets.T
        keys = keyvals.compute_keys(self.model, tok, name, batch, self.templates, hp.fact_token)
        k_star = keys.averaged.T.to(F64)
        k_c = k_star if hp.consistent_keys else keys.bare.T.to(F64)
        bias = 0 if module.bias is None else module.bias.detach().to(F64)[:, None]
        R = (v - (out_in(module) @ k_c + bias).to(v.dtype)).to(F64)  # v* − W k_c at the MLP output
        add_out_in(module, self.delta(name, k_star, R, k_c))

    def _spread(self, batch):
        hp, tok = self.hp, self.tok
        block = self.names.layer_module_tmp.format(hp.layers[-1])
        z = keyvals.compute_targets(self.model, tok, block, batch, self.templates, hp).targets.T
        for i, name in enumerate(self.modules):
            module = get_module(self.model, name)
            # keys at l_i and h_L on the model already edited at l_1 .. l_{i-1}
            K = keyvals.compute_keys(self.model, tok, name, batch, self.templates, hp.fact_token).averaged.T.to(F64)
            h = keyvals.module_output_at_subject(self.model, tok, block, batch, hp.fact_token).T
            R = ((z - h) / (len(self.modules) - i)).to(F64)  # in the dtype keyvals gives z and h in
            delta = self.delta(name, K, R)
            if hp.rect_top_fraction:
                delta = self.rect(delta, out_in(module))
            add_out_in(module, delta)
            self.S[name] = self.S[name] + K @ K.T  # after the solve: the next batch's S_t


def null_space_threshold(C0s) -> float:
    """A threshold with a gap on both sides, leaving a null space of about half of d_k in every matrix."""
    eigenvalues = torch.sort(torch.cat([torch.linalg.eigvalsh(C0) for C0 in C0s])).values
    middle = len(eigenvalues) // 2
    threshold = math.sqrt(eigenvalues[middle - 1].item() * eigenvalues[middle].item())
    for C0 in C0s:
        below = int((torch.linalg.eigvalsh(C0) < threshold).sum())
        assert 4 <= below <= C0.shape[0] - 4, below
    return threshold


CASES = {
    # name: (registry name, layers, hparams beyond base_hparams)
    "ROME": ("ROME", SINGLE, {"clamp_norm_factor": 100.0, "consistent_keys": False}),
    "ROME-consistent": ("ROME", SINGLE, {"clamp_norm_factor": 100.0, "consistent_keys": True}),
    "MEMIT": ("MEMIT", SPREAD, {}),
    "EMMET": ("EMMET", SPREAD, {"emmet_lambda": 0.1}),
    "ENCORE": ("ENCORE", SPREAD, {"update_norm_lambda": 10.0, "add_prev_edits": True, "prob_cutoff": -2.0}),
    "AlphaEdit": ("AlphaEdit", SPREAD, {"add_prev_edits": True, "L2": 10.0}),  # threshold set per model below
    "MEMIT-PRUNE": ("MEMIT-PRUNE", SPREAD, {"mom2_update_weight": 1.0}),  # small λ: ΔW outgrows σ_max(W_0)
    "MEMIT-RECT": ("MEMIT-RECT", SPREAD, {}),
}


def run_both(case, arch, models64, tok, corpus, stats_dir):
    """(Editor, DenseReference, [per batch: (editor weights, reference weights, edit report)])."""
    alg, layers, extra = CASES[case]
    model = models64[arch]
    data = base_hparams(corpus, layers, **extra)
    modules = [module_names(model).rewrite_module_tmp.format(layer) for layer in layers]
    probe = algorithm(alg).load_hparams(data)
    C0 = {name: moment.matrix for name, moment in
          second_moments_for(model, tok, probe, modules, stats_dir).items()}
    if alg == "AlphaEdit":
        data["nullspace_threshold"] = null_space_threshold([C0[name] for name in modules])
    editor = Editor(copy.deepcopy(model), tok, alg, data, stats_dir=stats_dir)
    reference = DenseReference(model, tok, alg, editor.hparams, C0)
    assert editor.hparams.mom2_update_weight == data["mom2_update_weight"]
    steps = []
    for batch in BATCHES:
        report = editor.edit(batch)
        reference.edit(batch)
        editor_weights = {name: out_in(get_module(editor.model, name)) for name in modules}
        steps.append((editor_weights, reference.weights(), report))
    # the Editor solved with the same C0 the reference used
    for name in modules:
        (moment,) = [m for key, m in editor.state.moments.items() if key[0] == name]
        assert torch.equal(moment.matrix, C0[name])
    return editor, reference, steps


def assert_same_updates(reference, steps, tol=TOL):
    previous = dict(reference.W0)
    for t, (editor_weights, reference_weights, _) in enumerate(steps):
        for name in reference.modules:
            dW_editor, dW_reference = editor_weights[name] - previous[name], reference_weights[name] - previous[name]
            assert torch.linalg.norm(dW_reference) > 0
            error = relative_error(dW_editor, dW_reference)
            assert error <= tol, f"batch {t}, {name}: ΔW differs from the dense formula by {error:.3g} (relative)"
        previous = reference_weights


# ---------------------------------------------------------------- the algorithms

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("case", ["ROME", "ROME-consistent", "MEMIT", "EMMET"])
def test_update_is_the_papers_formula(case, arch, models64, embedded_tokenizer, corpus, stats_dir):
    _, reference, steps = run_both(case, arch, models64, embedded_tokenizer, corpus, stats_dir)
    assert_same_updates(reference, steps)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_encore_update_norm_and_earlier_edits(arch, models64, embedded_tokenizer, corpus, stats_dir):
    """Δ = R Kᵀ (λC0 + uI + S_t + K Kᵀ)⁻¹ with S_t of batch 1 in batch 2; S_t = Σ K Kᵀ of the batches
    written, each once."""
    editor, reference, steps = run_both("ENCORE", arch, models64, embedded_tokenizer, corpus, stats_dir)
    assert_same_updates(reference, steps)
    assert [s["layers"][0]["solver"]["prev_edits"] for _, _, report in steps for s in report["batches"]] == \
        [False, True]
    for name in reference.modules:  # S_t after the last batch: both batches' keys, each once
        assert relative_error(editor.state.prev_keys_cov[name], reference.S[name]) <= TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_alphaedit_projected_update_without_lambda_c0(arch, models64, embedded_tokenizer, corpus,
                                                       stats_dir):
    editor, reference, steps = run_both("AlphaEdit", arch, models64, embedded_tokenizer, corpus, stats_dir)
    assert_same_updates(reference, steps)
    for name in reference.modules:
        assert relative_error(editor.state.prev_keys_cov[name], reference.S[name]) <= TOL
        # the accumulated update leaves C0's kept eigenspace (eigenvalues ≥ threshold) alone
        eigenvalues, eigenvectors = torch.linalg.eigh(reference.C0[name])
        kept = eigenvectors[:, eigenvalues >= reference.hp.nullspace_threshold]
        total = steps[-1][0][name] - reference.W0[name]
        assert torch.linalg.norm(total @ kept) <= 1e-9 * torch.linalg.norm(total)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_prune_restrains_the_accumulated_update(arch, models64, embedded_tokenizer, corpus,
                                                      stats_dir):
    editor, reference, steps = run_both("MEMIT-PRUNE", arch, models64, embedded_tokenizer, corpus, stats_dir)
    assert_same_updates(reference, steps)
    # PRUNE did something in both batches (else this would only test MEMIT)
    for _, _, report in steps:
        assert all(entry["restrained"] > 0 for entry in report["prune"].values()), report["prune"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_rect_keeps_the_top_fraction_of_each_update(arch, models64, embedded_tokenizer, corpus,
                                                          stats_dir):
    editor, reference, steps = run_both("MEMIT-RECT", arch, models64, embedded_tokenizer, corpus, stats_dir)
    assert_same_updates(reference, steps)
    previous = reference.W0
    for _, reference_weights, report in steps:
        for layer_report, name in zip(report["batches"][0]["layers"], reference.modules):
            delta = reference_weights[name] - previous[name]
            expected = math.ceil(round(editor.hparams.rect_top_fraction * delta.numel(), 6))
            assert int((delta != 0).sum()) == expected == layer_report["solver"]["rect_kept"]
        previous = reference_weights


def test_keyvals_keep_float64_for_a_float64_model(models64, embedded_tokenizer):
    tok, model = embedded_tokenizer, models64["llama"]
    hp = algorithm("MEMIT").load_hparams(base_hparams("unused.txt", SPREAD))
    names = module_names(model)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    block = names.layer_module_tmp.format(SPREAD[-1])
    keys = keyvals.compute_keys(model, tok, names.rewrite_module_tmp.format(SPREAD[0]), BATCHES[1], templates,
                                "subject_last")
    h = keyvals.module_output_at_subject(model, tok, block, BATCHES[1], "subject_last")
    z = keyvals.compute_targets(model, tok, block, BATCHES[1], templates, hp).targets
    assert [t.dtype for t in (keys.averaged, keys.bare, h, z)] == [F64] * 4
