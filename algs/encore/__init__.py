"""ENCORE (Gupta et al. 2025, "Lifelong Knowledge Editing requires Better Regularization"): MEMIT's
least-squares objective with a norm constraint (update_norm_lambda), preservation of earlier edits
(add_prev_edits) and most-probable early stopping of the target optimisation (prob_cutoff). Each is a
switch of the shared modules; with all three off ENCORE is MEMIT.
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_function
from algs.hparams import EditHparams
from algs.memit import least_squares


@dataclass
class ENCOREHyperParams(EditHparams):
    add_prev_edits: bool = True
    prob_cutoff: float = -2.0
    update_norm_lambda: float = 10.0


def objective(hparams: ENCOREHyperParams, batch_size: int) -> Objective:
    return least_squares("ENCORE", batch_size, hparams.mom2_update_weight, hparams.update_norm_lambda)


apply_encore_to_model = apply_function(objective)
