"""MEMIT: batch least-squares memorization, usually spread over several layers (Meng et al. 2022).

`least_squares` is MEMIT's objective with a given preservation; ENCORE and AlphaEdit use it too.
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_function
from algs.hparams import EditHparams
from algs.pm_solver import objective_params


@dataclass
class MEMITHyperParams(EditHparams):
    pass


def least_squares(name: str, batch_size: int, mom2_update_weight: float, update_norm_lambda: float) -> Objective:
    """MEMIT's least-squares edit with P = mom2_update_weight·C0 + update_norm_lambda·I (plus the lifelong
    switches of the hparams), reported under `name`."""
    return Objective(name, objective_params("memit", batch_size, mom2_update_weight,
                                            update_norm_lambda=update_norm_lambda),
                     flat_templates=False, value_at_mlp=False)


def objective(hparams: MEMITHyperParams, batch_size: int) -> Objective:
    return least_squares("MEMIT", batch_size, hparams.mom2_update_weight, hparams.update_norm_lambda)


apply_memit_to_model = apply_function(objective)
