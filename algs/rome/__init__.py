"""ROME: one fact at a time, equality constraint, v* at the MLP output (Meng et al. 2022)."""
from dataclasses import dataclass, field

from algs.distribute import Objective, apply_function
from algs.hparams import EditHparams
from algs.pm_solver import objective_params

ONE_AT_A_TIME = True  # each fact is its own rank-one edit, in order, on the model edited so far


@dataclass
class ROMEHyperParams(EditHparams):
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    # r-ROME (Gupta & Anumanchipalli 2024): use the template-averaged key k* in the constraint too.
    # Off by default to match the ROME paper's code, which constrains the bare-prompt key.
    consistent_keys: bool = False


def objective(hparams: ROMEHyperParams, batch_size: int) -> Objective:
    return Objective("ROME", objective_params("rome", batch_size, 1.0, update_norm_lambda=hparams.update_norm_lambda),
                     flat_templates=True, value_at_mlp=True, consistent_keys=hparams.consistent_keys)


apply_rome_to_model = apply_function(objective, one_at_a_time=ONE_AT_A_TIME)
