"""ROME: one fact at a time, equality constraint, v* at the MLP output (Meng et al. 2022)."""
from dataclasses import dataclass, field

from algs.distribute import Objective, apply_to_model
from algs.hparams import EditHparams
from algs.pm_solver import objective_params
from util.checks import check_edit_inputs


@dataclass
class ROMEHyperParams(EditHparams):
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    # r-ROME (Gupta & Anumanchipalli 2024): use the template-averaged key k* in the constraint too.
    # Off by default to match the ROME paper's code, which constrains the bare-prompt key.
    consistent_keys: bool = False


def apply_rome_to_model(model, tok, requests, hparams: ROMEHyperParams, copy=False, return_orig_weights=False,
                        **kwargs):
    check_edit_inputs(model, requests, hparams, "apply_rome_to_model")

    def objective(batch_size):
        return Objective("ROME", objective_params("rome", batch_size, 1.0, update_norm_lambda=hparams.update_norm_lambda),
                         flat_templates=True, value_at_mlp=True, consistent_keys=hparams.consistent_keys)

    return apply_to_model(model, tok, requests, hparams, objective, copy=copy,
                          return_orig_weights=return_orig_weights, one_at_a_time=True, **kwargs)
