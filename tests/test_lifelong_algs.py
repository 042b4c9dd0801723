"""The lifelong regularisers (SPEC §8) in the one solver: earlier-edit preservation (S_t), null-space
projection (AlphaEdit), MPES early stopping; ENCORE and AlphaEdit as thin registry entries; their sequential
state saved and resumed exactly; reference hparams files."""

import pytest
import torch
from safetensors import safe_open

from algs import Editor, get_algorithm, keyvals
from algs.distribute import second_moments_for
from algs.editor import STATE_PREFIX
from algs.hparams import HparamsError
from algs.pm_solver import PreservationFactor, null_space_basis, solve_update
from experiments import evaluate_unified_editing as cli
from experiments.run_store import CHECKPOINT_FILE
from tests.cli_workspace import argv_for, read_cases, run_and_kill, write_hparams
from tests.test_engine import EDIT_LAYER, EDIT_REQUESTS, N_LAYER, TEMPLATE_LENGTHS, editable_model, preference_margin
from tests.test_pm_solver import D_K, F64, close, make_batch, make_c0, memit_direct
from util.arch import get_module, module_names, weight_as_out_in
from util.io import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


LAMBDA, L2 = 100.0, 10.0


# ---------------------------------------------------------------- the solver

def null_space_c0(n_small=12, seed=0):
    """C0 with `n_small` eigenvalues far below 2e-2 (a null space) and the rest well above it."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D_K, D_K, generator=g, dtype=F64))
    eigenvalues = torch.cat([torch.full((n_small,), 1e-4, dtype=F64), torch.linspace(0.5, 3.0, D_K - n_small,
                                                                                      dtype=F64)])
    return Q @ torch.diag(eigenvalues) @ Q.mT, Q[:, n_small:]


def test_alphaedit_delta_equals_the_papers_formula_and_kills_the_kept_space():
    C0, kept = null_space_c0()
    K_prev, _ = make_batch(6, seed=3)
    S = K_prev @ K_prev.mT
    K, R = make_batch(4)
    U = null_space_basis(C0, 2e-2)
    assert U.shape == (D_K, 12)
    factor = PreservationFactor(C0, 0.0, L2, prev_keys_cov=S, basis=U)
    delta, diagnostics = solve_update(R, K, factor, 1.0)
    Q = U @ U.mT
    paper = torch.linalg.solve(((S + K @ K.mT) @ Q + L2 * torch.eye(D_K, dtype=F64)).mT, Q @ K @ R.mT).mT
    assert close(delta, paper, 1e-10)
    # Every key in the kept eigenspace of C0 is mapped to zero, to solver precision ...
    assert torch.linalg.norm(delta @ kept).item() < 1e-12 * torch.linalg.norm(delta).item()
    # ... and the batch is still written through the null-space part of its keys (least squares: the
    # ridge L2 and the earlier keys S_t leave a residual that shrinks with L2).
    residuals = [torch.linalg.norm(solve_update(R, K, PreservationFactor(C0, 0.0, l2, prev_keys_cov=S, basis=U),
                                                1.0)[0] @ K - R).item() / torch.linalg.norm(R).item()
                 for l2 in (L2, 1.0, 0.1)]
    assert residuals[0] < 0.6 and residuals[1] < 0.2 and residuals[2] < 0.05, residuals
    assert diagnostics["projected_dim"] == 12 and diagnostics["prev_edits"] is True


def test_previous_batch_keys_keep_their_values_with_add_prev_edits():
    lam = 1.0  # S_t = K1 K1ᵀ must weigh against λC0, as with real keys (norms ≫ 1) and λ = 1e4
    C0 = make_c0()
    K1, R1 = make_batch(8, seed=1)
    K2, R2 = make_batch(8, seed=2)
    base = PreservationFactor(C0, lam)
    without, _ = solve_update(R2, K2, base, 1.0)
    with_prev, diagnostics = solve_update(R2, K2, PreservationFactor(C0, lam, prev_keys_cov=K1 @ K1.mT), 1.0)
    assert diagnostics["prev_edits"] is True
    # ‖ΔK_prev‖: how far batch 2 moves the values batch 1 wrote.
    disturbance = {name: torch.linalg.norm(d @ K1).item() for name, d in (("without", without), ("with", with_prev))}
    assert disturbance["with"] < 0.25 * disturbance["without"], disturbance
    # It is the minimiser of λ tr(ΔC0Δᵀ) + ‖ΔK2 − R2‖² + ‖ΔK1‖²: the gradient vanishes (SPEC §1 with S_t).
    gradient = lam * with_prev @ C0 + (with_prev @ K2 - R2) @ K2.mT + with_prev @ K1 @ K1.mT
    assert torch.linalg.norm(gradient).item() < 1e-9 * torch.linalg.norm(R2 @ K2.mT).item()


def test_emmet_equality_still_holds_with_previous_edits():
    C0 = make_c0()
    K1, _ = make_batch(8, seed=1)
    K, R = make_batch(3)
    delta, _ = solve_update(R, K, PreservationFactor(C0, LAMBDA, prev_keys_cov=K1 @ K1.mT), 0.0)
    assert close(delta @ K, R, 1e-9)


def test_switches_off_give_memit():
    C0 = make_c0()
    K, R = make_batch(5)
    zero_prev = PreservationFactor(C0, LAMBDA, prev_keys_cov=torch.zeros(D_K, D_K, dtype=F64))
    assert close(solve_update(R, K, zero_prev, 1.0)[0], memit_direct(R, K, C0, LAMBDA), 1e-10)


# ---------------------------------------------------------------- MPES

def test_all_targets_argmax_checks_every_prompt_including_the_first():
    # Two requests, three rewrite rows each (row 0 of each is the bare prompt "{}"), one target token per row.
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    label_rows = torch.arange(6)
    label_ids = torch.tensor([2, 2, 2, 1, 1, 1])
    log_probs = torch.full((6, 4), -5.0)
    log_probs[torch.arange(6), label_ids] = -0.1
    log_probs[0, 3] = 0.0  # request 0's FIRST prompt predicts another token
    all_argmax = keyvals._all_targets_argmax(log_probs, label_ids, label_rows, owner, 2)
    assert all_argmax.tolist() == [False, True]


def test_mpes_stop_rules():
    streak = torch.tensor([0, 1, 2, 3])
    row_nll = torch.tensor([[0.1, 0.1], [2.0, 2.0], [0.01, 3.0], [0.0, 0.0]]).flatten()
    assert keyvals._mpes_stop(-2.0, streak, row_nll, 4, 2).tolist() == [False, False, True, True]
    # mean over prompts of exp(-nll): 0.905, 0.135, 0.52, 1.0
    assert keyvals._mpes_stop(0.5, streak, row_nll, 4, 2).tolist() == [True, False, True, True]
    assert keyvals._mpes_stop(0.0, streak, row_nll, 4, 2).tolist() == [False] * 4


def engine_hparams(alg, corpus, **overrides):
    hparams_class, _ = get_algorithm(alg)
    data = {"layers": [EDIT_LAYER], "v_num_grad_steps": 12, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
            "v_weight_decay": 1e-3, "clamp_norm_factor": 10.0, "kl_factor": 0.0625,
            "context_template_length_params": TEMPLATE_LENGTHS, "mom2_dataset": str(corpus), "dynamic": True,
            "dynamic_multiplier": 8, "mom2_update_weight": LAMBDA}
    return hparams_class.from_dict({**data, **overrides})


def test_mpes_stops_when_every_target_is_the_argmax_k_steps_in_a_row(embedded_tokenizer, corpus):
    tok = embedded_tokenizer
    model = editable_model("gpt2", tok)
    block = module_names(model).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    plain = keyvals.compute_targets(model, tok, block, EDIT_REQUESTS, templates,
                                    engine_hparams("MEMIT", corpus, v_num_grad_steps=20))
    mpes = keyvals.compute_targets(model, tok, block, EDIT_REQUESTS, templates,
                                   engine_hparams("MEMIT", corpus, v_num_grad_steps=20,
                                                  prob_cutoff=-2.0))
    for off, on in zip(plain.info, mpes.info):
        first = off["first_argmax_step"]
        assert first is not None and on["first_argmax_step"] == first  # same trajectory until MPES stops it
        assert on["stopped_by"] == "mpes"
        assert first + 1 <= on["updates"] < off["updates"]  # stops as soon as the 2nd argmax step is reached


# ---------------------------------------------------------------- the registry entries on a tiny model

@pytest.mark.parametrize("alg,off", [("ENCORE", {"add_prev_edits": False, "prob_cutoff": 0.0,
                                                  "update_norm_lambda": 0.0}),
                                     ("AlphaEdit", {"add_prev_edits": False, "nullspace_threshold": 0.0,
                                                    "L2": 0.0})])
def test_new_algorithms_with_switches_off_equal_memit(alg, off, embedded_tokenizer, corpus, stats_dir):
    tok = embedded_tokenizer
    model = editable_model("llama", tok)
    deltas = {}
    for name, hp in (("MEMIT", engine_hparams("MEMIT", corpus)), (alg, engine_hparams(alg, corpus, **off))):
        _, apply = get_algorithm(name)
        edited, saved = apply(model, tok, EDIT_REQUESTS, hp, copy=True, return_orig_weights=True, stats_dir=stats_dir)
        module = module_names(model).rewrite_module_tmp.format(EDIT_LAYER)
        deltas[name] = get_module(edited, module).weight.double() - saved[module].double()
    assert close(deltas[alg], deltas["MEMIT"], 1e-10)


def test_encore_and_alphaedit_write_facts_and_keep_state_sequentially(embedded_tokenizer, corpus, stats_dir,
                                                                     tmp_path):
    tok = embedded_tokenizer
    for alg in ("ENCORE", "AlphaEdit"):
        model = editable_model("gpt2", tok)
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        hp = engine_hparams(alg, corpus, **({"nullspace_threshold": 1e9} if alg == "AlphaEdit" else {}))
        editor = Editor(model, tok, alg, hp, stats_dir=stats_dir)
        module = module_names(model).rewrite_module_tmp.format(EDIT_LAYER)
        editor.edit(EDIT_REQUESTS[:1])
        state = {name: cov.clone() for name, cov in editor.state.prev_keys_cov.items()}
        assert set(state) == {module} and state[module].dtype == torch.float64
        editor.save_state(tmp_path / f"{alg}.safetensors")
        report = editor.edit(EDIT_REQUESTS[1:])
        assert report["batches"][0]["layers"][0]["solver"]["prev_edits"] is True
        assert preference_margin(model, tok, EDIT_REQUESTS[1]) < -1.0
        assert torch.linalg.eigvalsh(editor.state.prev_keys_cov[module]).min() > -1e-9  # Σ K Kᵀ: PSD
        assert len(editor.edits) == 2
        editor.restore()  # the edits are gone, and so is their state
        assert editor.state.prev_keys_cov == {} and editor.edits == []
        assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())
        editor.load_state(tmp_path / f"{alg}.safetensors")
        assert torch.equal(editor.state.prev_keys_cov[module], state[module]) and len(editor.edits) == 1


def test_alphaedit_edit_leaves_kept_space_keys_alone(embedded_tokenizer, corpus, stats_dir):
    """On a real (tiny) model: the written Δ maps C0's kept eigenvectors to ~0."""
    tok = embedded_tokenizer
    model = editable_model("llama", tok)
    _, apply = get_algorithm("AlphaEdit")
    module = module_names(model).rewrite_module_tmp.format(EDIT_LAYER)
    C0 = second_moments_for(model, tok, engine_hparams("AlphaEdit", corpus), [module], stats_dir)[module].matrix
    eigenvalues = torch.linalg.eigvalsh(C0)
    threshold = float(eigenvalues[len(eigenvalues) // 2])  # half the spectrum is "null space"
    edited, saved = apply(model, tok, EDIT_REQUESTS, engine_hparams("AlphaEdit", corpus, nullspace_threshold=threshold),
                          copy=True, return_orig_weights=True, stats_dir=stats_dir)
    delta = weight_as_out_in(get_module(edited, module)).double() - weight_as_out_in(
        get_module(model, module)).double()
    values, vectors = torch.linalg.eigh(C0)
    kept = vectors[:, values >= threshold]
    assert torch.linalg.norm(delta @ kept).item() < 1e-5 * torch.linalg.norm(delta).item()
    assert torch.linalg.norm(delta).item() > 0


# ---------------------------------------------------------------- hparams files

REFERENCE_ENCORE = {"layers": [1], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
                    "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": 3, "v_weight_decay": 0.5, "kl_factor": 0.0625,
                    "mom2_adjustment": True, "mom2_update_weight": 15000, "mom2_dataset": "wikipedia",
                    "mom2_n_samples": 10000, "mom2_dtype": "float32", "calculate_objective_value": False,
                    "add_prev_edits": True, "update_norm_lambda": 20, "emmet_lambda": 0.1, "prob_cutoff": -2,
                    "norm_control": 0, "use_gd": False, "dynamic_multiplier": 5, "random_vector_preservation": False,
                    "grad_desc_lr": 0.005, "grad_desc_steps": 100, "gd_lambda": 50, "spectral_norm": 2,
                    "condition_num": 50, "calculate_norms": False}
REFERENCE_ALPHAEDIT = {"model_name": "Llama3-8B", "layers": [1], "clamp_norm_factor": 0.75, "layer_selection": "all",
                       "fact_token": "subject_last", "v_num_grad_steps": 4, "v_lr": 0.1, "v_loss_layer": 3,
                       "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True,
                       "mom2_update_weight": 15000, "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
                       "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10}


def test_reference_hparams_load_with_inert_keys_recorded():
    encore = get_algorithm("ENCORE")[0].from_dict(REFERENCE_ENCORE, source="encore.json")
    assert encore.add_prev_edits is True and encore.prob_cutoff == -2 and encore.update_norm_lambda == 20
    assert encore.inert_keys["use_gd"] is False and encore.inert_keys["emmet_lambda"] == 0.1
    assert encore.to_dict()["inert_keys"]["grad_desc_steps"] == 100
    alphaedit = get_algorithm("AlphaEdit")[0].from_dict(REFERENCE_ALPHAEDIT, source="alphaedit.json")
    assert alphaedit.nullspace_threshold == 2e-2 and alphaedit.L2 == 10 and alphaedit.inert_keys == {
        "model_name": "Llama3-8B"}


@pytest.mark.parametrize("key,value", [("use_gd", True), ("norm_control", 1), ("calculate_objective_value", True),
                                       ("random_vector_preservation", True)])
def test_reference_key_at_an_active_value_is_one_clear_error(key, value):
    with pytest.raises(HparamsError) as error:
        get_algorithm("ENCORE")[0].from_dict({**REFERENCE_ENCORE, key: value}, source="encore.json")
    assert key in str(error.value) and "encore.json" in str(error.value) and "not supported" in str(error.value)


def test_shipped_hparams_files_load():
    root = cli.G.hparams_dir()
    for alg in ("ENCORE", "AlphaEdit"):
        names = sorted(p.name for p in (root / alg).glob("*.json"))
        assert names == ["EleutherAI_gpt-j-6B.json", "gpt2-xl.json", "llama2-7b.json", "llama3-8b.json",
                         "smollm2-135m.json"]
        for name in names:
            get_algorithm(alg)[0].from_json(root / alg / name)


# ---------------------------------------------------------------- sequential state through the CLI

def encore_hparams_file(ws, path):
    return write_hparams(path, ws.corpus, emmet_lambda=None, add_prev_edits=True, prob_cutoff=-2,
                         update_norm_lambda=1.0)


def checkpoint_tensors(run_dir):
    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_killed_sequential_encore_run_resumes_bit_exactly(ws, tmp_path):
    hparams = encore_hparams_file(ws, tmp_path / "encore.json")
    extra = ("--sequential", "--skip_generation_tests")
    assert cli.main(argv_for(ws, tmp_path / "straight", *extra, hparams=hparams, alg="ENCORE")) == 0
    straight = tmp_path / "straight" / "ENCORE" / "run_000"
    reference = checkpoint_tensors(straight)
    state_names = [name for name in reference if name.startswith(STATE_PREFIX)]
    assert state_names == [STATE_PREFIX + "transformer.h.1.mlp.c_proj"]

    argv = argv_for(ws, tmp_path / "killed", *extra, hparams=hparams, alg="ENCORE")
    run_dir = tmp_path / "killed" / "ENCORE" / "run_000"
    log_path = tmp_path / "killed.log"
    run_and_kill(argv, [run_dir / CHECKPOINT_FILE], log_path)
    assert read_json(run_dir / "params.json")["status"] == "running"
    assert cli.main(argv + ["--continue_from_run=run_000"]) == 0
    resumed = checkpoint_tensors(run_dir)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():  # weights and S_t: bit for bit
        assert torch.equal(resumed[name], tensor), name
    cases, straight_cases = read_cases(run_dir), read_cases(straight)
    for case_id, case in straight_cases.items():
        assert cases[case_id]["post"] == case["post"]
        assert cases[case_id]["edit"]["target_optimisation"]["updates"] == case["edit"]["target_optimisation"]["updates"]


def test_batched_mode_starts_every_batch_from_empty_state(ws, tmp_path):
    hparams = encore_hparams_file(ws, tmp_path / "encore.json")
    assert cli.main(argv_for(ws, tmp_path / "batched", "--skip_generation_tests", hparams=hparams,
                             alg="ENCORE")) == 0
    assert cli.main(argv_for(ws, tmp_path / "sequential", "--sequential", "--skip_generation_tests",
                             hparams=hparams, alg="ENCORE")) == 0
    for mode, expected in (("batched", [False, False, False]), ("sequential", [False, True, True])):
        cases = read_cases(tmp_path / mode / "ENCORE" / "run_000")
        by_batch = {case["batch"]: case["edit"]["layers"][0]["solver"]["prev_edits"] for case in cases.values()}
        assert [by_batch[b] for b in sorted(by_batch)] == expected, mode
