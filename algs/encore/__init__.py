"""ENCORE (Gupta et al. 2025, "Lifelong Knowledge Editing requires Better Regularization"): MEMIT's
least-squares objective with a norm constraint (update_norm_lambda), preservation of earlier edits
(add_prev_edits) and most-probable early stopping of the target optimisation (prob_cutoff). Each is a
switch of the shared modules; with all three off ENCORE is MEMIT.
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_to_model
from algs.hparams import EditHparams
from algs.pm_solver import objective_params
from util.checks import check_edit_inputs


@dataclass
class ENCOREHyperParams(EditHparams):
    add_prev_edits: bool = True
    prob_cutoff: float = -2.0
    update_norm_lambda: float = 10.0


def apply_encore_to_model(model, tok, requests, hparams: ENCOREHyperParams, copy=False, return_orig_weights=False,
                          **kwargs):
    check_edit_inputs(model, requests, hparams, "apply_encore_to_model")

    def objective(batch_size):
        return Objective("ENCORE", objective_params("memit", batch_size, hparams.mom2_update_weight,
                                                    update_norm_lambda=hparams.update_norm_lambda),
                         flat_templates=False, value_at_mlp=False)

    return apply_to_model(model, tok, requests, hparams, objective, copy=copy,
                          return_orig_weights=return_orig_weights, **kwargs)
