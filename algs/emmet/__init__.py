"""EMMET: batch equality-constrained memorization (Gupta, Sajnani, Anumanchipalli 2024).

The ridge `emmet_lambda` on D = K_Eᵀ (λC0)⁻¹ K_E keeps large batches solvable; as in the reference code,
none is added for a batch of one (EMMET with B = 1 is ROME with consistent keys).
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_to_model
from algs.hparams import EditHparams
from algs.pm_solver import objective_params
from util.checks import check_edit_inputs


@dataclass
class EMMETHyperParams(EditHparams):
    emmet_lambda: float = 0.1


def apply_emmet_to_model(model, tok, requests, hparams: EMMETHyperParams, copy=False, return_orig_weights=False,
                         **kwargs):
    check_edit_inputs(model, requests, hparams, "apply_emmet_to_model")

    def objective(batch_size):
        return Objective("EMMET", objective_params("emmet", batch_size, hparams.mom2_update_weight,
                                                   emmet_lambda=hparams.emmet_lambda,
                                                   update_norm_lambda=hparams.update_norm_lambda),
                         flat_templates=False, value_at_mlp=False)

    return apply_to_model(model, tok, requests, hparams, objective, copy=copy,
                          return_orig_weights=return_orig_weights, **kwargs)
