"""MEMIT: batch least-squares memorization, usually spread over several layers (Meng et al. 2022)."""
from dataclasses import dataclass

from algs.distribute import Objective, apply_to_model
from algs.hparams import EditHparams
from algs.pm_solver import objective_params
from util.checks import check_edit_inputs


@dataclass
class MEMITHyperParams(EditHparams):
    pass


def apply_memit_to_model(model, tok, requests, hparams: MEMITHyperParams, copy=False, return_orig_weights=False,
                         **kwargs):
    check_edit_inputs(model, requests, hparams, "apply_memit_to_model")

    def objective(batch_size):
        return Objective("MEMIT", objective_params("memit", batch_size, hparams.mom2_update_weight,
                                                   update_norm_lambda=hparams.update_norm_lambda),
                         flat_templates=False, value_at_mlp=False)

    return apply_to_model(model, tok, requests, hparams, objective, copy=copy,
                          return_orig_weights=return_orig_weights, **kwargs)
