"""The editing engine on tiny random models: SPEC §1 identities on real keys and C0, whole edits with ROME,
MEMIT and EMMET on four architectures, update orientation, batched targets, the target cache, bad requests.

Two things make edits measurable on a random model, and both are set up here, not in the engine:
- its output embedding is scaled up (`LOGIT_SCALE`), otherwise every next-token distribution is near uniform;
- the edited prompts end with the subject, so the edited position is the one that predicts the target
  (random attention carries almost nothing from earlier tokens).
"""
import copy

import pytest
import torch

from algs import Editor, get_algorithm, keyvals
from algs.distribute import second_moments_for
from algs.pm_solver import PreservationFactor, objective_params, solve_update
from tests.conftest import make_tiny_model
from util.arch import get_module, module_names, weight_as_out_in
from util.models import model_identity
from util.tokens import prompt_token_ids, target_token_ids

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")
N_LAYER, EDIT_LAYER = 4, 2
LOGIT_SCALE = 30.0
LAMBDA = 100.0  # mom2_update_weight
TEMPLATE_LENGTHS = [[3, 2]]  # "{}" + 2 generated 3-token prefixes
CLAMP = {"ROME": 100.0, "MEMIT": 10.0, "EMMET": 10.0}  # ROME's is relative to the (small) MLP output norm
EDIT_REQUESTS = [
    {"case_id": 0, "prompt": "The home city of {}", "subject": "Danielle Darrieux",
     "target_new": {"str": "London"}, "target_true": {"str": "Paris"}},
    {"case_id": 1, "prompt": "The mother tongue of {}", "subject": "Albert Camus",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}},
]
KEY_REQUESTS = [  # subject at the start, middle and end of the prompt
    {"prompt": "{} is located in", "subject": "Danielle Darrieux", "target_new": {"str": "London"}},
    {"prompt": "The mother tongue of {} is", "subject": "Albert Camus", "target_new": {"str": "English"}},
    {"prompt": "The capital of {}", "subject": "France", "target_new": {"str": "Rome"}},
    {"prompt": "In 1990, {} played for the", "subject": "Michael Jordan", "target_new": {"str": "Lakers"}},
]


def relative_error(a, b) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def make_hparams(corpus):
    def make(alg, **overrides):
        hparams_class, _ = get_algorithm(alg)
        data = {"layers": [EDIT_LAYER], "v_num_grad_steps": 12, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
                "v_weight_decay": 1e-3, "clamp_norm_factor": CLAMP[alg], "kl_factor": 0.0625,
                "context_template_length_params": TEMPLATE_LENGTHS, "mom2_dataset": str(corpus), "dynamic": True,
                "dynamic_multiplier": 8, "mom2_update_weight": LAMBDA}
        return hparams_class.from_dict({**data, **overrides})

    return make


def editable_model(arch, tok, **sizes):
    """A tiny random model whose next-token distributions are peaked enough for an edit to show."""
    model = make_tiny_model(arch, tok, n_layer=N_LAYER, **sizes)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    return model


def tiny_hparams(corpus, layers, mom2_update_weight, dynamic_multiplier=8, **overrides) -> dict:
    """Hparams of a short edit of an editable_model: 6 Adam steps, FastMEMIT C0 from the local corpus."""
    return {"layers": layers, "v_num_grad_steps": 6, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
            "v_weight_decay": 1e-3, "clamp_norm_factor": 10.0, "kl_factor": 0.0625,
            "context_template_length_params": TEMPLATE_LENGTHS, "mom2_dataset": str(corpus), "dynamic": True,
            "dynamic_multiplier": dynamic_multiplier, "mom2_update_weight": mom2_update_weight, **overrides}


@pytest.fixture(scope="module")
def editable_models(embedded_tokenizer):
    return {arch: editable_model(arch, embedded_tokenizer) for arch in ARCHS}


def mean_target_nll(model, tok, prompt, target) -> float:
    prompt_ids, target_ids = prompt_token_ids(tok, prompt), target_token_ids(tok, target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0]
    log_probs = torch.log_softmax(logits.double(), -1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
    return -sum(log_probs[p, t].item() for p, t in zip(positions, target_ids)) / len(target_ids)


def preference_margin(model, tok, request) -> float:
    """NLL(target_new) − NLL(target_true): negative when the model prefers the new target."""
    prompt = request["prompt"].format(request["subject"])
    return (mean_target_nll(model, tok, prompt, request["target_new"]["str"])
            - mean_target_nll(model, tok, prompt, request["target_true"]["str"]))


def rewrite_name(model, layer):
    return module_names(model).rewrite_module_tmp.format(layer)


# ---------------------------------------------------------------- (a) SPEC §1 on real keys and C0

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def real_problem(request, embedded_tokenizer, make_hparams, stats_dir):
    """K_E (d_k × 4) from compute_keys, C0 from second_moment, seeded random residuals R (float64)."""
    tok = embedded_tokenizer
    model = make_tiny_model(request.param, tok, n_layer=N_LAYER)
    name = rewrite_name(model, EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    keys = keyvals.compute_keys(model, tok, name, KEY_REQUESTS, templates, "subject_last")
    moment = second_moments_for(model, tok, make_hparams("EMMET"), [name], stats_dir)[name]
    d_v = weight_as_out_in(get_module(model, name)).shape[0]
    R = torch.randn(d_v, len(KEY_REQUESTS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"model": model, "name": name, "templates": templates, "keys": keys, "C0": moment.matrix,
            "n_tokens": moment.n_tokens, "K": keys.averaged.T.double(), "R": R}


def test_keys_are_the_module_inputs_at_the_subject(real_problem, embedded_tokenizer):
    """k_bare and k* against plain pre-hooks on unpadded one-prompt forward passes.

    The subject's last token is the last token of the text up to the subject's end (byte-level BPE;
    util.tokens itself is tested in test_tokens.py)."""
    tok, model, name = embedded_tokenizer, real_problem["model"], real_problem["name"]
    captured = []
    handle = get_module(model, name).register_forward_pre_hook(lambda module, args: captured.append(args[0][0]))
    try:
        for i, request in enumerate(KEY_REQUESTS):
            prefix = request["prompt"].split("{}")[0]
            per_group = []
            for group in real_problem["templates"]:
                group_keys = []
                for template in group:
                    filled = template.replace("{}", request["prompt"]).format(request["subject"])
                    context = template.split("{}")[0]
                    position = len(tok(context + prefix + request["subject"])["input_ids"]) - 1
                    captured.clear()
                    with torch.no_grad():
                        model(input_ids=torch.tensor([tok(filled)["input_ids"]]))
                    group_keys.append(captured[0][position])
                per_group.append(torch.stack(group_keys).mean(0))
            assert torch.allclose(real_problem["keys"].bare[i], per_group[0], atol=1e-5)
            assert torch.allclose(real_problem["keys"].averaged[i], torch.stack(per_group).mean(0), atol=1e-5)
    finally:
        handle.remove()


def test_c0_is_well_conditioned(real_problem):
    C0 = real_problem["C0"]
    d_k = C0.shape[0]
    assert real_problem["n_tokens"] == 8 * d_k
    eigenvalues = torch.linalg.eigvalsh(C0)
    assert eigenvalues.min() > 0
    assert eigenvalues.max() / eigenvalues.min() < 1e8


def test_emmet_batch_of_one_is_the_rome_formula(real_problem):
    C0, K, R = real_problem["C0"], real_problem["K"], real_problem["R"]
    k, r = K[:, :1], R[:, :1]
    C0inv_k = torch.linalg.solve(C0, k)
    rome = r @ C0inv_k.T / (k.T @ C0inv_k)
    params = objective_params("emmet", 1, LAMBDA, emmet_lambda=0.1)
    emmet, _ = solve_update(r, k, PreservationFactor(C0, params.mom2_update_weight), params.rho)
    assert relative_error(emmet, rome) < 1e-9


def test_emmet_writes_the_values_exactly(real_problem):
    K, R = real_problem["K"], real_problem["R"]
    delta, diagnostics = solve_update(R, K, PreservationFactor(real_problem["C0"], LAMBDA), 0.0)
    assert relative_error(delta @ K, R) < 1e-8
    assert diagnostics["fallback"] is None


def test_memit_equals_emmet_with_ridge_and_the_direct_solve(real_problem):
    C0, K, R = real_problem["C0"], real_problem["K"], real_problem["R"]
    direct = torch.linalg.solve(LAMBDA * C0 + K @ K.T, K @ R.T).T
    params = objective_params("memit", K.shape[1], LAMBDA)
    memit, _ = solve_update(R, K, PreservationFactor(C0, params.mom2_update_weight), params.rho)
    ridge, _ = solve_update(R, K, PreservationFactor(C0, 1.0), LAMBDA)  # R (KᵀC0⁻¹K + λI)⁻¹ KᵀC0⁻¹
    dkxdk, _ = solve_update(R, K, PreservationFactor(C0, LAMBDA), 1.0, form="dkxdk")
    for delta in (memit, ridge, dkxdk):
        assert relative_error(delta, direct) < 1e-8


def test_emmet_minimises_preservation_cost_among_feasible_updates(real_problem):
    C0, K, R = real_problem["C0"], real_problem["K"], real_problem["R"]
    delta, _ = solve_update(R, K, PreservationFactor(C0, LAMBDA), 0.0)
    G = torch.randn(R.shape[0], C0.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    M = G - (G @ K) @ torch.linalg.solve(K.T @ K, K.T)  # M K = 0: delta + M is feasible too
    assert torch.linalg.norm(M @ K) < 1e-8 * torch.linalg.norm(G @ K)

    def cost(D):
        return torch.trace(D @ C0 @ D.T).item()

    assert abs(torch.trace(delta @ C0 @ M.T).item()) < 1e-8 * (cost(delta) * cost(M)) ** 0.5  # first order
    for scale in (1e-3, 1.0):
        assert cost(delta + scale * M) > cost(delta)


def test_memit_objective_gradient_vanishes(real_problem):
    C0, K, R = real_problem["C0"], real_problem["K"], real_problem["R"]
    delta, _ = solve_update(R, K, PreservationFactor(C0, LAMBDA), 1.0)
    preservation, memorization = LAMBDA * delta @ C0, (delta @ K - R) @ K.T  # halves of the gradient
    gradient = preservation + memorization
    assert torch.linalg.norm(gradient) < 1e-9 * (torch.linalg.norm(preservation) + torch.linalg.norm(memorization))


def test_rome_original_and_consistent_keys(real_problem):
    """Original ROME constrains the bare key, r-ROME / EMMET (B = 1) the averaged k*; λ cancels in both."""
    C0, keys, R = real_problem["C0"], real_problem["keys"], real_problem["R"]
    k_star, k_bare, r = keys.averaged[:1].T.double(), keys.bare[:1].T.double(), R[:, :1]
    assert relative_error(k_bare, k_star) > 1e-2
    rome = objective_params("rome", 1, 1.0)
    original, _ = solve_update(r, k_star, PreservationFactor(C0, rome.mom2_update_weight), rome.rho, K_c=k_bare)
    consistent, _ = solve_update(r, k_star, PreservationFactor(C0, rome.mom2_update_weight), rome.rho)
    emmet = objective_params("emmet", 1, LAMBDA, emmet_lambda=0.1)
    emmet_delta, _ = solve_update(r, k_star, PreservationFactor(C0, emmet.mom2_update_weight), emmet.rho)
    C0inv_k_star = torch.linalg.solve(C0, k_star)
    assert relative_error(original, r @ C0inv_k_star.T / (k_bare.T @ C0inv_k_star)) < 1e-9
    assert relative_error(original @ k_bare, r) < 1e-9
    assert relative_error(consistent @ k_star, r) < 1e-9
    assert relative_error(consistent, emmet_delta) < 1e-9
    assert relative_error(original, consistent) > 1e-3


# ---------------------------------------------------------------- (b) whole edits

@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "EMMET"])
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_writes_the_fact_and_weights_restore(arch, alg, editable_models, embedded_tokenizer, make_hparams,
                                                  stats_dir):
    tok, model = embedded_tokenizer, editable_models[arch]
    hp = make_hparams(alg, layers=[1, 2] if alg == "MEMIT" else [EDIT_LAYER])
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = [preference_margin(model, tok, r) for r in EDIT_REQUESTS]
    editor = Editor(copy.deepcopy(model), tok, alg, hp, stats_dir=stats_dir)
    report = editor.edit(EDIT_REQUESTS)
    edited, orig_weights = editor.model, editor.state.original_weights

    assert edited is not model
    assert all(p.requires_grad for p in edited.parameters())  # frozen() during the optimisation, then restored
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())  # copy=True: untouched
    after = [preference_margin(edited, tok, r) for r in EDIT_REQUESTS]
    for request, margin_before, margin_after in zip(EDIT_REQUESTS, before, after):
        assert margin_after < -1.0, (request["case_id"], margin_before, margin_after, report)
        assert margin_before - margin_after > 2.0, (request["case_id"], margin_before, margin_after)

    rewritten = {rewrite_name(model, layer) for layer in hp.layers}
    assert set(orig_weights) == rewritten
    changed = {name for name, p in edited.named_parameters() if not torch.equal(p, original[name])}
    assert changed == {f"{name}.weight" for name in rewritten}  # MEMIT spread: both layers; else one
    for name, weight in orig_weights.items():
        assert torch.equal(weight, original[f"{name}.weight"])
    editor.restore()
    assert all(torch.equal(p, original[name]) for name, p in edited.named_parameters())


def test_memit_spread_changes_exactly_its_layers(editable_models, embedded_tokenizer, make_hparams, stats_dir,
                                                 tmp_path):
    """Layers [2] change one matrix, [1, 2] two (targets shared through the cache: same z at layer 2)."""
    tok, model = embedded_tokenizer, editable_models["llama"]
    for layers in ([2], [1, 2]):
        editor = Editor(copy.deepcopy(model), tok, "MEMIT", make_hparams("MEMIT", layers=layers), stats_dir=stats_dir,
                        target_cache_dir=tmp_path)
        report = editor.edit(EDIT_REQUESTS)
        edited = editor.model
        changed = {name for (name, p), p0 in zip(edited.named_parameters(), model.parameters())
                   if not torch.equal(p, p0)}
        assert changed == {f"{rewrite_name(model, layer)}.weight" for layer in layers}
        assert [entry["layer"] for entry in report["batches"][0]["layers"]] == layers


def test_spread_splits_the_residual_over_layers(embedded_tokenizer, make_hparams, stats_dir):
    """SPEC §2 with an equality objective: Δ_1 k_1* = (z − h_L)/2 on the unedited model, then
    Δ_2 k_2* = z − h_L' with keys and h_L' of the model already edited at layer 1."""
    tok = embedded_tokenizer
    model = editable_model("llama", tok)
    model0 = copy.deepcopy(model)
    hp = make_hparams("EMMET", layers=[1, 2], emmet_lambda=0.0)
    _, apply = get_algorithm("EMMET")
    apply(model, tok, EDIT_REQUESTS, hp, stats_dir=stats_dir)

    first, second = rewrite_name(model0, 1), rewrite_name(model0, 2)
    block = module_names(model0).layer_module_tmp.format(2)
    templates = keyvals.context_templates(model0, tok, TEMPLATE_LENGTHS)
    z = keyvals.compute_targets(model0, tok, block, EDIT_REQUESTS, templates, hp).targets
    h0 = keyvals.module_output_at_subject(model0, tok, block, EDIT_REQUESTS, "subject_last")
    k1 = keyvals.compute_keys(model0, tok, first, EDIT_REQUESTS, templates, "subject_last").averaged
    model1 = copy.deepcopy(model0)  # edited at layer 1 only
    with torch.no_grad():
        get_module(model1, first).weight.copy_(get_module(model, first).weight)
        change1 = get_module(model1, first)(k1) - get_module(model0, first)(k1)
    assert relative_error(change1, (z - h0) / 2) < 1e-4
    h1 = keyvals.module_output_at_subject(model1, tok, block, EDIT_REQUESTS, "subject_last")
    k2 = keyvals.compute_keys(model1, tok, second, EDIT_REQUESTS, templates, "subject_last").averaged
    with torch.no_grad():
        change2 = get_module(model, second)(k2) - get_module(model0, second)(k2)
    assert relative_error(change2, z - h1) < 1e-4


def test_spread_statistics_come_from_the_unedited_model(embedded_tokenizer, make_hparams, tmp_path):
    """With a cold stats cache, C0 of the second spread layer must still be that of the unedited model."""
    tok = embedded_tokenizer
    model = editable_model("llama", tok)
    model0 = copy.deepcopy(model)
    hp = make_hparams("MEMIT", layers=[1, 2])
    _, apply = get_algorithm("MEMIT")
    apply(model, tok, EDIT_REQUESTS, hp, stats_dir=tmp_path / "cold")
    for layer in hp.layers:
        name = rewrite_name(model0, layer)
        cached = second_moments_for(model0, tok, hp, [name], tmp_path / "cold")[name]
        unedited = second_moments_for(model0, tok, hp, [name], tmp_path / "fresh")[name]
        assert cached.cache == "hit" and unedited.cache == "miss"
        assert torch.allclose(cached.matrix, unedited.matrix, rtol=1e-6, atol=0), f"C0 of layer {layer}"


# ---------------------------------------------------------------- (c) orientation of the update

@pytest.mark.parametrize("d_mlp", [32, 64])  # 32 == d_model: a transposed Δ would fit the weight's shape
@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D (d_in, d_out) and nn.Linear (d_out, d_in)
def test_edited_module_maps_k_star_to_its_value(arch, d_mlp, embedded_tokenizer, make_hparams, stats_dir):
    """After an EMMET equality edit at one layer: module(k*) − module0(k*) = R = z − h_L, per request."""
    tok = embedded_tokenizer
    model = editable_model(arch, tok, d_mlp=d_mlp)
    model0 = copy.deepcopy(model)
    hp = make_hparams("EMMET", emmet_lambda=0.0)
    _, apply = get_algorithm("EMMET")
    apply(model, tok, EDIT_REQUESTS, hp, stats_dir=stats_dir)

    name = rewrite_name(model0, EDIT_LAYER)
    block = module_names(model0).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model0, tok, TEMPLATE_LENGTHS)
    k_star = keyvals.compute_keys(model0, tok, name, EDIT_REQUESTS, templates, "subject_last").averaged
    z = keyvals.compute_targets(model0, tok, block, EDIT_REQUESTS, templates, hp).targets
    h = keyvals.module_output_at_subject(model0, tok, block, EDIT_REQUESTS, "subject_last")
    with torch.no_grad():
        change = get_module(model, name)(k_star) - get_module(model0, name)(k_star)
    assert relative_error(change, z - h) < 1e-4


# ---------------------------------------------------------------- (d) batched target optimisation

def test_batched_targets_equal_one_at_a_time(editable_models, embedded_tokenizer, make_hparams):
    tok, model = embedded_tokenizer, editable_models["gpt2"]
    requests = EDIT_REQUESTS + [{"prompt": "The favourite food of {}", "subject": "Marie Curie",
                                 "target_new": {"str": "bread"}}]
    hp = make_hparams("MEMIT", v_num_grad_steps=15, kl_factor=0.0)  # the KL term keeps every loss above 5e-2
    block = module_names(model).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)
    batched = keyvals.compute_targets(model, tok, block, requests, templates, hp)
    chunked = keyvals.compute_targets(model, tok, block, requests, templates, hp, max_requests=2)
    steps = [info["updates"] for info in batched.info]
    assert len(set(steps)) > 1 and min(steps) < hp.v_num_grad_steps - 1  # one stopped early, others went on
    for i, request in enumerate(requests):
        alone = keyvals.compute_targets(model, tok, block, [request], templates, hp)
        assert relative_error(batched.targets[i], alone.targets[0]) < 1e-4
        assert relative_error(chunked.targets[i], alone.targets[0]) < 1e-4
        assert torch.allclose(batched.initial[i], alone.initial[0], atol=1e-5)
        assert batched.info[i]["updates"] == alone.info[0]["updates"]

    early = steps.index(min(steps))
    moved = batched.targets[early] - batched.initial[early]
    assert moved.norm() > 0
    # With exactly steps + 1 iterations the optimisation cannot go on after the early stop.
    truncated = keyvals.compute_targets(model, tok, block, [requests[early]], templates,
                                        make_hparams("MEMIT", v_num_grad_steps=steps[early] + 1, kl_factor=0.0))
    assert relative_error(batched.targets[early], truncated.targets[0]) < 1e-4


# ---------------------------------------------------------------- (e) target cache

def test_target_cache_hits_and_misses(editable_models, embedded_tokenizer, make_hparams, tmp_path, caplog):
    tok, model = embedded_tokenizer, editable_models["gptj"]
    hp = make_hparams("EMMET", v_num_grad_steps=4)
    block = module_names(model).layer_module_tmp.format(EDIT_LAYER)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS)

    def targets(hparams=hp, model_key=("tiny", "r0")):
        return keyvals.compute_targets(model, tok, block, EDIT_REQUESTS, templates, hparams, cache_dir=tmp_path,
                                       model_key=list(model_key))

    first = targets()
    assert not any(info.get("cache") == "hit" for info in first.info)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(EDIT_REQUESTS)
    second = targets()
    assert [info.get("cache") for info in second.info] == ["hit"] * len(EDIT_REQUESTS)
    assert torch.equal(second.targets, first.targets) and torch.equal(second.initial, first.initial)

    assert not any(info.get("cache") == "hit" for info in targets(make_hparams("EMMET", v_num_grad_steps=4,
                                                                               clamp_norm_factor=3.0)).info)
    assert not any(info.get("cache") == "hit" for info in targets(model_key=("tiny", "r1")).info)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3 * len(EDIT_REQUESTS)

    files[0].write_bytes(files[0].read_bytes()[:40])  # a truncated file is ignored and rewritten
    third = targets()
    assert [info.get("cache") for info in third.info].count("hit") == len(EDIT_REQUESTS) - 1
    assert torch.allclose(third.targets, first.targets, atol=1e-6)
    assert "ignoring unreadable target cache file" in caplog.text


# ---------------------------------------------------------------- (f) ROME keys, engine level

def test_rome_constrains_bare_or_averaged_key(editable_models, embedded_tokenizer, make_hparams, stats_dir,
                                              tmp_path):
    """Original ROME: Ŵ k_bare = v*; consistent keys: Ŵ k* = v*; v* read back from the shared target cache."""
    tok, model = embedded_tokenizer, editable_models["gpt2"]
    request = EDIT_REQUESTS[:1]
    _, apply = get_algorithm("ROME")
    name = rewrite_name(model, EDIT_LAYER)
    edited = {}
    for consistent in (False, True):
        hp = make_hparams("ROME", consistent_keys=consistent)
        result, _ = apply(model, tok, request, hp, copy=True, stats_dir=stats_dir, target_cache_dir=tmp_path)
        edited[consistent] = get_module(result, name)
    templates = keyvals.context_templates(model, tok, TEMPLATE_LENGTHS, flat=True)
    mlp = module_names(model).mlp_module_tmp.format(EDIT_LAYER)
    values = keyvals.compute_targets(model, tok, mlp, request, templates, hp, cache_dir=tmp_path,
                                     model_key=list(model_identity(model)))
    assert values.info[0]["cache"] == "hit"
    keys = keyvals.compute_keys(model, tok, name, request, templates, "subject_last")
    assert relative_error(keys.bare, keys.averaged) > 1e-2
    with torch.no_grad():
        assert relative_error(edited[False](keys.bare), values.targets) < 1e-4
        assert relative_error(edited[True](keys.averaged), values.targets) < 1e-4
        assert relative_error(edited[False].weight, edited[True].weight) > 1e-6


# ---------------------------------------------------------------- (h) bad input

@pytest.mark.parametrize("request_update,message", [
    ({"prompt": "The home city of Danielle Darrieux"}, "one '{}'"),
    ({"prompt": "{} and {}"}, "one '{}'"),
    ({"target_new": None}, "lacks \\['target_new'\\]"),
    ({"target_new": "London"}, "target_new is 'London'"),
])
def test_bad_requests_raise_clear_errors(request_update, message, editable_models, embedded_tokenizer,
                                         make_hparams):
    request = {**EDIT_REQUESTS[0], **request_update}
    if request["target_new"] is None:
        del request["target_new"]
    _, apply = get_algorithm("EMMET")
    with pytest.raises(ValueError, match=message):
        apply(editable_models["gpt2"], embedded_tokenizer, [request], make_hparams("EMMET"))


def test_v_loss_layer_must_be_the_last_layer(editable_models, embedded_tokenizer, make_hparams):
    _, apply = get_algorithm("MEMIT")
    with pytest.raises(ValueError, match="v_loss_layer"):
        apply(editable_models["gpt2"], embedded_tokenizer, EDIT_REQUESTS, make_hparams("MEMIT", v_loss_layer=2))
