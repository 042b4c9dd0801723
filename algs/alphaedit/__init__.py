"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's least-squares objective with the update projected onto the
null space of C0 (nullspace_threshold) and earlier edits preserved (add_prev_edits, its "cache_c").

The projection is AlphaEdit's preservation term: with it on, λC0 is not in the solve (as in the paper and
its code) and the ridge is L2 (+ update_norm_lambda), giving Δ = R Kᵀ Q ((S_t + K Kᵀ) Q + L2·I)⁻¹. With
the projection off the λC0 preservation of MEMIT is used, so with every switch off AlphaEdit is MEMIT.
"""
from dataclasses import dataclass

from algs.distribute import Objective, apply_function
from algs.hparams import EditHparams
from algs.memit import least_squares


@dataclass
class AlphaEditHyperParams(EditHparams):
    add_prev_edits: bool = True
    nullspace_threshold: float = 2e-2
    L2: float = 10.0  # ridge on the projected update (AlphaEdit's name for it)


def objective(hparams: AlphaEditHyperParams, batch_size: int) -> Objective:
    mom2_update_weight = 0.0 if hparams.nullspace_threshold > 0 else hparams.mom2_update_weight
    return least_squares("AlphaEdit", batch_size, mom2_update_weight, hparams.L2 + hparams.update_norm_lambda)


apply_alphaedit_to_model = apply_function(objective)
