"""EMMET: batch equality-constrained memorization (Gupta, Sajnani, Anumanchipalli 2024).

The ridge `emmet_lambda` on D = K_Eᵀ (λC0)⁻¹ K_E keeps large batches solvable; as in the reference code,
none is added for a batch of one (EMMET with B = 1 is ROME with consistent keys).
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_function
from algs.hparams import EditHparams
from algs.pm_solver import objective_params


@dataclass
class EMMETHyperParams(EditHparams):
    emmet_lambda: float = 0.1


def objective(hparams: EMMETHyperParams, batch_size: int) -> Objective:
    return Objective("EMMET", objective_params("emmet", batch_size, hparams.mom2_update_weight,
                                               emmet_lambda=hparams.emmet_lambda,
                                               update_norm_lambda=hparams.update_norm_lambda),
                     flat_templates=False, value_at_mlp=False)


apply_emmet_to_model = apply_function(objective)
