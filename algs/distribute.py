"""The layer loop (SPEC §2): which matrices change, in what order, with which residual.

Single layer: edit layers = [L]. MEMIT spread: layers l_1 < ... < l_m, target at L = l_m; at each l_i, on
the model as already edited below, the remaining residual at L is split evenly over the layers left.
The objective (ROME / MEMIT / EMMET / ENCORE / AlphaEdit) only picks the solver's softness `rho` and the
preservation matrix; the lifelong switches of the hparams (add_prev_edits, nullspace_threshold) change the
preservation matrix for every objective alike (SPEC §8).
"""
import copy as copy_module
import time
from dataclasses import dataclass

import torch

from algs import keyvals, regularisers
from algs.pm_solver import ObjectiveParams, PreservationFactor, null_space_basis, solve_update
from algs.stats_cache import SecondMoment
from algs.second_moment import layer_second_moments
from algs.state import EditState
from util.arch import get_module, module_names, num_layers, add_update, weight_as_out_in
from util.checks import check_edit_inputs
from util.models import model_identity


@dataclass(frozen=True)
class Objective:
    """What an algorithm chooses; everything else is shared."""

    name: str
    solver: ObjectiveParams  # P = λC0 + uI and the softness ρ (algs.pm_solver.objective_params)
    flat_templates: bool  # ROME averages all templates equally; MEMIT/EMMET average template groups
    value_at_mlp: bool  # ROME: target v* at the MLP output; else z at the residual stream of the last layer
    consistent_keys: bool = True  # False (original ROME): the constraint is on the bare-prompt key


@dataclass(frozen=True)
class EditOptions:
    """How an edit runs (never what it computes, except `seed`, which picks the context templates).

    stats_dir / published_stats_dir: where C0 is cached / read from the reference repos' .npz files.
    target_cache_dir: reuse target vectors computed earlier for the same request on the same unedited
    weights (valid only while the model is unedited, e.g. batched evaluation that restores weights).
    prefix_cache: False runs the baseline target optimisation (every token every step; for benchmarks).
    solve_device: where C0, its factors and the float64 solve live ("cpu" saves GPU memory); default:
    the device of each edited matrix.
    """

    seed: int = 0
    stats_dir: object = None
    published_stats_dir: object = None
    target_cache_dir: object = None
    prefix_cache: bool = True
    solve_device: object = None


def edited_modules(model, hp) -> list[str]:
    """Names of the matrices an edit with `hp` changes, in layer order."""
    names = module_names(model, hp.module_overrides())
    return [names.rewrite_module_tmp.format(layer) for layer in hp.layers]


def orig_weights(model, hp) -> dict:
    """Copies of the matrices an edit with `hp` would change, keyed by module name."""
    return {name: get_module(model, name).weight.detach().clone() for name in edited_modules(model, hp)}


def put_weights(model, weights: dict) -> None:
    """Copy saved matrices into the model (bit for bit, on the model's device and dtype)."""
    with torch.no_grad():
        for name, weight in weights.items():
            get_module(model, name).weight.copy_(weight)


def second_moments_for(model, tok, hp, rewrite_modules: list, stats_dir=None, published_stats_dir=None) -> dict:
    """{module: C0} of the hparams' statistics; the missing ones in one pass (or from published .npz files)."""
    model_id, revision = model_identity(model)
    return layer_second_moments(
        model, tok, rewrite_modules, corpus=hp.mom2_dataset, dynamic=hp.dynamic,
        dynamic_multiplier=hp.dynamic_multiplier, n_samples=hp.mom2_n_samples, model_id=model_id,
        model_revision=revision, dtype=hp.mom2_dtype, stats_dir=stats_dir, published_stats_dir=published_stats_dir,
        max_length=hp.mom2_max_length,
    )


def _key_dim(model, rewrite_module: str) -> int:
    return weight_as_out_in(get_module(model, rewrite_module)).shape[1]


def _moment_key(hp, rewrite_module, options: EditOptions) -> tuple:
    """What determines a matrix's C0: the same statistics recipe gives the same key (a multiplier without
    `dynamic`, or an article count with it, changes nothing)."""
    sample = ("tokens", hp.dynamic_multiplier) if hp.dynamic else ("articles", hp.mom2_n_samples)
    return (rewrite_module, hp.mom2_adjustment, hp.mom2_dataset, sample, hp.mom2_dtype, hp.mom2_max_length,
            str(options.stats_dir), str(options.published_stats_dir))


def _null_space(state: EditState, rewrite_module: str, moment, threshold: float):
    """U of C0's eigenvectors below the threshold (AlphaEdit), kept with C0; None when the threshold is 0."""
    if not threshold:
        return None
    key = (rewrite_module, id(moment.matrix), float(threshold))
    if key not in state.projections:
        state.projections[key] = null_space_basis(moment.matrix, threshold)
    return state.projections[key]


def _preservation(state: EditState, rewrite_module: str, moment, hp, solver: ObjectiveParams, device):
    """The factor of P_t = λC0 + uI (+ S_t of earlier batches with add_prev_edits), in the null-space
    coordinates when nullspace_threshold > 0. Without S_t the per-layer cached factor is reused."""
    basis = _null_space(state, rewrite_module, moment, hp.nullspace_threshold)
    C0 = state.on(moment.matrix, device)
    basis = None if basis is None else state.on(basis, device)
    prev = state.prev_keys_cov.get(rewrite_module) if hp.add_prev_edits else None
    if prev is None:
        return state.factors.get(rewrite_module, C0, solver.mom2_update_weight, solver.update_norm_lambda, basis)
    return PreservationFactor(C0, solver.mom2_update_weight, solver.update_norm_lambda,
                              prev_keys_cov=prev.to(device), basis=basis)


def layer_moments(model, tok, hp, state: EditState, options: EditOptions) -> dict:
    """{layer: SecondMoment} for every edited layer, from the state when already made; the others from
    second_moment (disk cache, published files, or one pass for all); identity when mom2_adjustment is off."""
    modules = dict(zip(hp.layers, edited_modules(model, hp)))
    missing = [module for module in modules.values() if _moment_key(hp, module, options) not in state.moments]
    if missing and hp.mom2_adjustment:
        made = second_moments_for(model, tok, hp, missing, options.stats_dir, options.published_stats_dir)
    else:
        made = {module: SecondMoment(torch.eye(_key_dim(model, module), dtype=torch.float64), 0, 0,
                                     "none (identity)", "not used", None) for module in missing}
    for module, moment in made.items():
        state.moments[_moment_key(hp, module, options)] = moment
    return {layer: state.moments[_moment_key(hp, module, options)] for layer, module in modules.items()}


def prepare_unedited(model, tok, hp, state: EditState, options: EditOptions) -> None:
    """Make now, on the model as it is, what edits take from the unedited model: context templates, C0 and
    the copies of the original matrices.

    Edits make them on first use; a run that loads edited weights before its first edit (a resumed
    sequential run) calls this first so that it continues exactly as the uninterrupted run would.
    """
    for flat in (False, True):
        keyvals.context_templates(model, tok, hp.context_template_length_params, options.seed, flat=flat,
                                  cache=state.templates)
    layer_moments(model, tok, hp, state, options)
    for name in edited_modules(model, hp):
        state.keep_original(name, get_module(model, name).weight)


def edit_layers(model, tok, requests, hp, objective: Objective, state: EditState, options: EditOptions,
                target_cache_dir=None) -> dict:
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
    templates = keyvals.context_templates(model, tok, hp.context_template_length_params, options.seed,
                                          flat=objective.flat_templates, cache=state.templates)
    lap("templates")
    targets = keyvals.compute_targets(model, tok, target_module, requests, templates, hp,
                                      cache_dir=target_cache_dir, model_key=list(model_identity(model)),
                                      prefix_cache=options.prefix_cache)
    lap("targets")
    report = {"objective": objective.name, "target_module": target_module, "batch_size": len(requests),
              "target_optimisation": targets.info, "layers": []}
    # C0 of every edited layer before any layer changes: the statistics describe the unedited model.
    moments = layer_moments(model, tok, hp, state, options)
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
        report["layers"].append(_solve_and_apply(model, tok, rewrite_module, layer, keys, constraint_keys, residual,
                                                 moments[layer], hp, objective, state, options))
        lap("solve")
    report["seconds"] = time.time() - started
    report["phase_seconds"] = phases
    return report


def _solve_and_apply(model, tok, rewrite_module, layer, keys, constraint_keys, residual, moment, hp,
                     objective: Objective, state: EditState, options: EditOptions) -> dict:
    """Solve one matrix's update, filter it (RECT), add it, and note its keys in S_t; the layer's report."""
    module = get_module(model, rewrite_module)
    # The solve runs in float64 on the edited matrix's device, or on the CPU when asked (GPU memory).
    device = torch.device(options.solve_device) if options.solve_device else weight_as_out_in(module).device
    key_matrix = keys.averaged.T.to(device)
    factor = _preservation(state, rewrite_module, moment, hp, objective.solver, device)
    delta, diagnostics = solve_update(residual.T.to(key_matrix.device), key_matrix, factor, objective.solver.rho,
                                      K_c=None if constraint_keys is keys.averaged else
                                      constraint_keys.T.to(key_matrix.device))
    if hp.add_prev_edits:  # S_t of the next batch: these keys join the preserved ones
        written = key_matrix.to(torch.float64) @ key_matrix.to(torch.float64).mT
        previous = state.prev_keys_cov.get(rewrite_module)
        state.prev_keys_cov[rewrite_module] = written.cpu() if previous is None else previous + written.cpu()
    weight = weight_as_out_in(module)
    if hp.rect_top_fraction:
        delta, diagnostics["rect_kept"] = regularisers.rect_filter(delta, weight, hp.rect_top_fraction)
    state.keep_original(rewrite_module, module.weight)
    add_update(module, delta.to(device=weight.device, dtype=weight.dtype))
    stats_info = {"corpus": moment.corpus, "n_tokens": moment.n_tokens, "cache": moment.cache,
                  **({"published": moment.provenance} if moment.provenance else {})}
    return {"layer": layer, "module": rewrite_module, "statistics": stats_info, "solver": diagnostics,
            "weight_norm": weight.norm().item()}


def apply_to_model(model, tok, requests, hp, objective_for, state: EditState, options: EditOptions,
                   one_at_a_time: bool = False) -> dict:
    """Write `requests` into the model in place, on top of the edits in `state`; the edit report
    {"batches": [one report per solve]}. `objective_for(batch_size)` gives the Objective.

    one_at_a_time: ROME writes each fact by its own rank-one edit, in order, on the model edited so far.
    PRUNE (hparams prune_log_base) restrains the accumulated update of every edited matrix afterwards.
    """
    check_edit_inputs(model, requests, hp, f"apply_{objective_for(1).name.lower()}_to_model")
    batches = [[r] for r in requests] if one_at_a_time else [list(requests)]
    unedited = not state.edits
    # Only an edit of the unedited weights may use the target cache, which is keyed by them.
    reports = [edit_layers(model, tok, batch, hp, objective_for(len(batch)), state, options,
                           options.target_cache_dir if unedited and i == 0 else None)
               for i, batch in enumerate(batches)]
    report = {"batches": reports}
    if hp.prune_log_base:
        report["prune"] = {name: regularisers.prune_restrain(get_module(model, name), state.original_weights[name],
                                                              hp.prune_log_base, state)
                           for name in edited_modules(model, hp)}
    state.edits.extend(dict(request) for request in requests)
    return report


def apply_function(objective_for_hparams, one_at_a_time: bool = False):
    """The reference repos' `apply_<alg>_to_model(model, tok, requests, hparams, copy, return_orig_weights)`
    for an algorithm given by `objective_for_hparams(hparams, batch_size)`. Each call starts from a fresh
    EditState unless one is passed (`state=`); the Editor (algs.editor) is the stateful way to edit."""
    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, state=None, **options):
        if copy:
            model = copy_module.deepcopy(model)
        saved = orig_weights(model, hparams) if return_orig_weights else {}
        apply_to_model(model, tok, requests, hparams, lambda batch_size: objective_for_hparams(hparams, batch_size),
                       EditState() if state is None else state, EditOptions(**options), one_at_a_time)
        return model, saved

    return apply
