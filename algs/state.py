"""EditState: everything an edit depends on besides the model's weights (SPEC §12).

It is explicit, so two editors never share it by accident, a notebook can look at it, and a sequential
checkpoint is exactly it (plus the edited matrices): what the reference code keeps in globals (C0 and its
Cholesky factors, AlphaEdit's null-space bases and `cache_c`, the context templates) lives here.

Derived from the unedited model (made on first use; recomputable, not saved):
  templates       context templates per (lengths, seed, flat)
  moments         C0 of each edited matrix (a SecondMoment), keyed by everything that determines it
  factors         Cholesky factors of λC0 + uI (pm_solver.FactorCache)
  projections     null-space bases U of C0 (AlphaEdit)
  on_device       copies of C0 / U on the devices the solves run on (kept so cached factors stay valid)
  original_top_singular  σ_max(W_0) of each edited matrix (PRUNE)
The edits (saved with a sequential checkpoint; cleared by `clear_edits`):
  prev_keys_cov   S_t = Σ K Kᵀ of the keys earlier batches wrote into each matrix (float64, CPU)
  edits           the requests applied so far, in order
  original_weights  W_0 of every matrix edited so far (copies, CPU): what `restore` puts back
"""
from dataclasses import dataclass, field

import torch

from algs.pm_solver import FactorCache


@dataclass
class EditState:
    templates: dict = field(default_factory=dict)
    moments: dict = field(default_factory=dict)
    factors: FactorCache = field(default_factory=FactorCache)
    projections: dict = field(default_factory=dict)
    on_device: dict = field(default_factory=dict)
    original_top_singular: dict = field(default_factory=dict)  # PRUNE: σ_max(W_0) per original matrix
    prev_keys_cov: dict = field(default_factory=dict)
    edits: list = field(default_factory=list)
    original_weights: dict = field(default_factory=dict)

    def keep_original(self, name: str, weight: torch.Tensor) -> None:
        """Remember W_0 of a matrix before its first edit (later calls keep the first copy)."""
        if name not in self.original_weights:
            self.original_weights[name] = weight.detach().to("cpu", copy=True)

    def clear_edits(self) -> None:
        """Forget the edits (S_t and the list); the caller has put the original weights back."""
        self.prev_keys_cov.clear()
        self.edits.clear()

    def on(self, matrix: torch.Tensor, device) -> torch.Tensor:
        """`matrix` on `device`, copied once per device (the factor cache is keyed by the tensor's identity)."""
        device = torch.device(device)
        if matrix.device == device:
            return matrix
        key = (id(matrix), str(device))
        if key not in self.on_device:
            self.on_device[key] = (matrix.to(device), matrix)  # the source is held so its id stays unique
        return self.on_device[key][0]
