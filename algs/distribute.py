"""The layer loop (SPEC §2): which matrices change, in what order, with which residual.

Single layer: edit layers = [L]. MEMIT spread: layers l_1 < ... < l_m, target at L = l_m; at each l_i, on
the model as already edited below, the remaining residual at L is split evenly over the layers left.
The objective (ROME / MEMIT / EMMET / ENCORE / AlphaEdit) only picks the solver's softness `rho` and the
preservation matrix; the lifelong switches of the hparams (add_prev_edits, nullspace_threshold) change the
preservation matrix for every objective alike (SPEC §8).
"""
import copy as copy_module
import time
import weakref
from dataclasses import dataclass

import torch

from algs import keyvals
from algs.pm_solver import FactorCache, ObjectiveParams, PreservationFactor, null_space_basis, solve_update
from algs.second_moment import SecondMoment, layer_second_moments
from util.arch import get_module, module_names, num_layers, add_update, weight_as_out_in
from util.models import model_identity



class _LayerCache:
    """Per model: C0 of each edited matrix (of the unedited model, as in the references), its factors and
    null-space projections, and the sequential edit state: S_t = Σ K Kᵀ of the keys written into each
    matrix by earlier batches (add_prev_edits)."""

    def __init__(self):
        self.moments = {}
        self.factors = FactorCache()
        self.projections = {}
        self.on_device = {}  # (id of a CPU matrix, device) -> its copy there, kept so cached factors stay valid
        self.prev_keys_cov = {}


_CACHES = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Objective:
    """What an algorithm chooses; everything else is shared."""

    name: str
    solver: ObjectiveParams  # P = λC0 + uI and the softness ρ (algs.pm_solver.objective_params)
    flat_templates: bool  # ROME averages all templates equally; MEMIT/EMMET average template groups
    value_at_mlp: bool  # ROME: target v* at the MLP output; else z at the residual stream of the last layer
    consistent_keys: bool = True  # False (original ROME): the constraint is on the bare-prompt key


def orig_weights(model, hp) -> dict:
    """Copies of the matrices an edit with `hp` would change, keyed by module name."""
    names = module_names(model, hp.module_overrides())
    return {name: get_module(model, name).weight.detach().clone()
            for name in (names.rewrite_module_tmp.format(layer) for layer in hp.layers)}


def restore_weights(model, weights: dict) -> None:
    """Put saved matrices back; the sequential edit state (S_t) is cleared with them, since the edits it
    describes are gone."""
    with torch.no_grad():
        for name, weight in weights.items():
            get_module(model, name).weight.copy_(weight)
    if model in _CACHES:
        _CACHES[model].prev_keys_cov.clear()


def sequential_state(model) -> dict:
    """{rewrite module: S_t (d_k × d_k, float64, CPU)}: what a sequential checkpoint must save beside the weights."""
    cache = _CACHES.get(model)
    return {name: cov.detach().cpu() for name, cov in cache.prev_keys_cov.items()} if cache else {}


def load_sequential_state(model, state: dict) -> None:
    """Replace the model's sequential edit state by a saved one (a resumed run continues exactly)."""
    cache = _CACHES.setdefault(model, _LayerCache())
    cache.prev_keys_cov = {name: cov.to(torch.float64) for name, cov in state.items()}


def second_moment_for(model, tok, hp, rewrite_module: str, stats_dir=None, published_stats_dir=None):
    return second_moments_for(model, tok, hp, [rewrite_module], stats_dir, published_stats_dir)[rewrite_module]


def second_moments_for(model, tok, hp, rewrite_modules: list, stats_dir=None, published_stats_dir=None) -> dict:
    """{module: C0} of the hparams' statistics; the missing ones in one pass (or from published .npz files)."""
    model_id, revision = model_identity(model)
    return layer_second_moments(
        model, tok, rewrite_modules, corpus=hp.mom2_dataset, dynamic=hp.dynamic,
        dynamic_multiplier=hp.dynamic_multiplier, n_samples=hp.mom2_n_samples, model_id=model_id,
        model_revision=revision, dtype=hp.mom2_dtype, stats_dir=stats_dir, published_stats_dir=published_stats_dir,
    )


def _key_dim(model, rewrite_module: str) -> int:
    return weight_as_out_in(get_module(model, rewrite_module)).shape[1]


def _moment_key(hp, rewrite_module, stats_dir, published_stats_dir) -> tuple:
    return (rewrite_module, hp.mom2_adjustment, hp.mom2_dataset, hp.dynamic, hp.dynamic_multiplier,
            hp.mom2_n_samples, hp.mom2_dtype, str(stats_dir), str(published_stats_dir))


def _null_space(cache, rewrite_module: str, moment, threshold: float):
    """U of C0's eigenvectors below the threshold (AlphaEdit), cached with C0; None when the threshold is 0."""
    if not threshold:
        return None
    key = (rewrite_module, id(moment.matrix), float(threshold))
    if key not in cache.projections:
        cache.projections[key] = null_space_basis(moment.matrix, threshold)
    return cache.projections[key]


def _on_device(cache, matrix: torch.Tensor, device) -> torch.Tensor:
    """`matrix` on `device`, copied once per device (the factor cache is keyed by the tensor's identity)."""
    device = torch.device(device)
    if matrix.device == device:
        return matrix
    key = (id(matrix), str(device))
    if key not in cache.on_device:
        cache.on_device[key] = (matrix.to(device), matrix)  # the source is held so its id stays unique
    return cache.on_device[key][0]


def _preservation(cache, rewrite_module: str, moment, hp, solver: ObjectiveParams, device):
    """The factor of P_t = λC0 + uI (+ S_t of earlier batches with add_prev_edits), in the null-space
    coordinates when nullspace_threshold > 0. Without S_t the per-layer cached factor is reused."""
    basis = _null_space(cache, rewrite_module, moment, hp.nullspace_threshold)
    C0 = _on_device(cache, moment.matrix, device)
    basis = None if basis is None else _on_device(cache, basis, device)
    prev = cache.prev_keys_cov.get(rewrite_module) if hp.add_prev_edits else None
    if prev is None:
        return cache.factors.get(rewrite_module, C0, solver.mom2_update_weight, solver.update_norm_lambda, basis)
    return PreservationFactor(C0, solver.mom2_update_weight, solver.update_norm_lambda,
                              prev_keys_cov=prev.to(device), basis=basis)


def _layer_moments(model, tok, hp, names, stats_dir, published_stats_dir=None) -> dict:
    """{layer: SecondMoment} for every edited layer, from the per-model cache when already made; the others
    from second_moment (disk cache, published files, or one pass for all); identity when mom2_adjustment is off."""
    cache = _CACHES.setdefault(model, _LayerCache())
    modules = {layer: names.rewrite_module_tmp.format(layer) for layer in hp.layers}
    missing = [module for module in modules.values()
               if _moment_key(hp, module, stats_dir, published_stats_dir) not in cache.moments]
    if missing and hp.mom2_adjustment:
        made = second_moments_for(model, tok, hp, missing, stats_dir, published_stats_dir)
    else:
        made = {module: SecondMoment(torch.eye(_key_dim(model, module), dtype=torch.float64), 0, 0,
                                     "none (identity)", "not used", None) for module in missing}
    for module, moment in made.items():
        cache.moments[_moment_key(hp, module, stats_dir, published_stats_dir)] = moment
    return {layer: cache.moments[_moment_key(hp, module, stats_dir, published_stats_dir)]
            for layer, module in modules.items()}


def prepare_unedited(model, tok, hp, seed: int = 0, stats_dir=None, published_stats_dir=None) -> None:
    """Make now, on the model as it is, what edits take from the unedited model: context templates and C0.

    Edits make them on first use; a run that loads edited weights before its first edit (a resumed
    sequential run) calls this first so that it continues exactly as the uninterrupted run would.
    """
    for flat in (False, True):
        keyvals.context_templates(model, tok, hp.context_template_length_params, seed, flat=flat)
    _layer_moments(model, tok, hp, module_names(model, hp.module_overrides()), stats_dir, published_stats_dir)


def edit_layers(model, tok, requests, hp, objective: Objective, seed: int = 0, stats_dir=None,
                target_cache_dir=None, prefix_cache=True, published_stats_dir=None, solve_device=None) -> dict:
    """Compute and apply the edit of `requests` (one batch) in place; returns a JSON-able report with the
    seconds spent per phase (templates, statistics, targets, keys, solve)."""
    started = time.time()
    phases = {"templates": 0.0, "statistics": 0.0, "targets": 0.0, "keys": 0.0, "solve": 0.0}
    clock = [time.perf_counter()]

    def lap(phase):
        now = time.perf_counter()
        phases[phase] += now - clock[0]
        clock[0] = now

    names = module_names(model, hp.module_overrides())
    last_layer = num_layers(model) - 1
    if hp.v_loss_layer != last_layer:
        raise ValueError(f"v_loss_layer must be the model's last layer ({last_layer}), got {hp.v_loss_layer}")
    value_at_mlp = objective.value_at_mlp and len(hp.layers) == 1
    target_layer = hp.layers[-1]
    target_module = (names.mlp_module_tmp if value_at_mlp else names.layer_module_tmp).format(target_layer)
    templates = keyvals.context_templates(model, tok, hp.context_template_length_params, seed,
                                          flat=objective.flat_templates)
    lap("templates")
    targets = keyvals.compute_targets(model, tok, target_module, requests, templates, hp,
                                      cache_dir=target_cache_dir, model_key=list(model_identity(model)),
                                      prefix_cache=prefix_cache)
    lap("targets")
    report = {"objective": objective.name, "target_module": target_module, "batch_size": len(requests),
              "target_optimisation": targets.info, "layers": []}
    # C0 of every edited layer before any layer changes: the statistics describe the unedited model.
    moments = _layer_moments(model, tok, hp, names, stats_dir, published_stats_dir)
    cache = _CACHES[model]
    lap("statistics")
    for i, layer in enumerate(hp.layers):
        rewrite_module = names.rewrite_module_tmp.format(layer)
        module = get_module(model, rewrite_module)
        keys = keyvals.compute_keys(model, tok, rewrite_module, requests, templates, hp.fact_token)
        if value_at_mlp:
            constraint_keys = keys.averaged if objective.consistent_keys else keys.bare
            residual = targets.targets - keyvals.apply_matrix(module, constraint_keys)
        else:
            constraint_keys = keys.averaged
            current = keyvals.module_output_at_subject(model, tok, target_module, requests, hp.fact_token)
            residual = (targets.targets - current) / (len(hp.layers) - i)
        lap("keys")

        moment = moments[layer]
        # The solve runs in float64 on the edited matrix's device, or on the CPU when asked (GPU memory).
        device = torch.device(solve_device) if solve_device else weight_as_out_in(module).device
        key_matrix = keys.averaged.T.to(device)
        factor = _preservation(cache, rewrite_module, moment, hp, objective.solver, device)
        delta, diagnostics = solve_update(residual.T.to(key_matrix.device), key_matrix, factor,
                                          objective.solver.rho,
                                          K_c=None if constraint_keys is keys.averaged else
                                          constraint_keys.T.to(key_matrix.device))
        if hp.add_prev_edits:  # S_t of the next batch: these keys join the preserved ones
            written = key_matrix.to(torch.float64) @ key_matrix.to(torch.float64).mT
            previous = cache.prev_keys_cov.get(rewrite_module)
            cache.prev_keys_cov[rewrite_module] = (written.cpu() if previous is None else previous + written.cpu())
        stats_info = {"corpus": moment.corpus, "n_tokens": moment.n_tokens, "cache": moment.cache,
                      **({"published": moment.provenance} if moment.provenance else {})}
        weight = weight_as_out_in(module)
        add_update(module, delta.to(device=weight.device, dtype=weight.dtype))
        report["layers"].append({"layer": layer, "module": rewrite_module, "statistics": stats_info,
                                 "solver": diagnostics, "weight_norm": weight.norm().item()})
        lap("solve")
    report["seconds"] = time.time() - started
    report["phase_seconds"] = phases
    return report


def apply_to_model(model, tok, requests, hp, objective_for, *, copy=False, return_orig_weights=False,
                   one_at_a_time=False, report=None, seed=0, stats_dir=None, target_cache_dir=None,
                   prefix_cache=True, published_stats_dir=None, solve_device=None):
    """The body every apply_<alg>_to_model shares. `objective_for(batch_size)` gives the Objective.

    one_at_a_time: ROME writes each fact by its own rank-one edit, in order, on the model edited so far.
    report: a dict to receive {"batches": [per-batch reports]} (optional).
    target_cache_dir: reuse target vectors computed earlier for the same request on the same unedited weights
    (only valid when the model is unedited, e.g. batched evaluation that restores weights).
    prefix_cache: False runs the baseline target optimisation (every token every step; for benchmarks).
    published_stats_dir: read C0 from the reference repos' .npz statistics there (algs.second_moment).
    solve_device: where C0, its factors and the float64 solve live ("cpu" saves GPU memory); default: the
    device of each edited matrix.
    Returns (model, orig_weights): orig_weights holds copies of the changed matrices if asked, else {}.
    """
    if copy:
        model = copy_module.deepcopy(model)
    for request in requests:
        _check_request(request)
    saved = orig_weights(model, hp) if return_orig_weights else {}
    batches = [[r] for r in requests] if one_at_a_time else [list(requests)]
    # Only the first batch sees the unedited weights that the target cache is keyed by.
    reports = [edit_layers(model, tok, batch, hp, objective_for(len(batch)), seed, stats_dir,
                           target_cache_dir if i == 0 else None, prefix_cache, published_stats_dir, solve_device)
               for i, batch in enumerate(batches)]
    if report is not None:
        report["batches"] = reports
    return model, saved


def _check_request(request):
    missing = [k for k in ("prompt", "subject", "target_new") if k not in request]
    if missing:
        raise ValueError(f"request {request.get('case_id', '?')} lacks {missing}")
    if request["prompt"].count("{}") != 1:
        raise ValueError(f"request prompt must hold one '{{}}' for the subject: {request['prompt']!r}")
    if not isinstance(request["target_new"], dict) or "str" not in request["target_new"]:
        raise ValueError(f"request target_new must be {{'str': ...}}, got {request['target_new']!r}")
