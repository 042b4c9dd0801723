"""MEMIT: batch least-squares memorization, usually spread over several layers (Meng et al. 2022).

`apply_least_squares` is MEMIT's objective with a given preservation; ENCORE and AlphaEdit use it too.
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_to_model
from algs.hparams import EditHparams
from algs.pm_solver import objective_params
from util.checks import check_edit_inputs


@dataclass
class MEMITHyperParams(EditHparams):
    pass


def apply_least_squares(name: str, model, tok, requests, hparams, mom2_update_weight: float,
                        update_norm_lambda: float, copy=False, return_orig_weights=False, **kwargs):
    """MEMIT's least-squares edit with P = mom2_update_weight·C0 + update_norm_lambda·I (plus the lifelong
    switches of `hparams`), reported under `name`."""
    check_edit_inputs(model, requests, hparams, f"apply_{name.lower()}_to_model")

    def objective(batch_size):
        return Objective(name, objective_params("memit", batch_size, mom2_update_weight,
                                                update_norm_lambda=update_norm_lambda),
                         flat_templates=False, value_at_mlp=False)

    return apply_to_model(model, tok, requests, hparams, objective, copy=copy,
                          return_orig_weights=return_orig_weights, **kwargs)


def apply_memit_to_model(model, tok, requests, hparams: MEMITHyperParams, copy=False, return_orig_weights=False,
                         **kwargs):
    return apply_least_squares("MEMIT", model, tok, requests, hparams, hparams.mom2_update_weight,
                               hparams.update_norm_lambda, copy, return_orig_weights, **kwargs)
