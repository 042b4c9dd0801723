"""Regularisers applied to the weights an edit writes, usable with every algorithm (SPEC §8); off by default.

PRUNE (Ma et al., ICLR 2025, arXiv 2405.16821): sequential edits grow the accumulated update ΔW = W_t − W_0 until
its large singular values dwarf the original matrix's and its condition number explodes. After each batch,
each singular value σ̂ of ΔW above σ_max(W_0) is replaced by
    F(σ̂) = log_α(σ̂) − log_α(σ_max(W_0)) + σ_max(W_0)
(continuous at σ_max, growing only logarithmically beyond it), and W_t = W_0 + U F(Σ) Vᵀ. hparams
`prune_log_base` = α (> 1; 0 = off; the authors' code uses the natural log, α = e).

RECT (Gu et al. 2024, arXiv 2401.04700): of each update Δ (one matrix, one solve), keep only the
`rect_top_fraction` of entries with the largest relative change |Δ_ij| / |W_ij| (W: the weight the update is
added to), zeroing the rest. hparams `rect_top_fraction` in (0, 1]; 0 = off.
"""
import math

import torch

from util.arch import is_conv1d, weight_as_out_in


def prune_singular_values(singular_values: torch.Tensor, original_max: float, log_base: float) -> torch.Tensor:
    """PRUNE's F applied to the singular values above `original_max`; the others are kept."""
    if not log_base > 1:
        raise ValueError(f"prune_log_base must be > 1, got {log_base}")
    restrained = (torch.log(singular_values.clamp_min(original_max)) - math.log(original_max)) / math.log(log_base) \
        + original_max
    return torch.where(singular_values > original_max, restrained, singular_values)


def prune_restrain(module, original_weight: torch.Tensor, log_base: float, state) -> dict:
    """Restrain the accumulated update of `module` (W_t − W_0, float64) in place; what was changed."""
    weight = weight_as_out_in(module)
    W0 = original_weight.T if is_conv1d(module) else original_weight
    W0 = W0.to(device=weight.device, dtype=torch.float64)
    key = id(original_weight)
    if key not in state.original_top_singular:
        state.original_top_singular[key] = (torch.linalg.matrix_norm(W0, ord=2).item(), original_weight)
    original_max = state.original_top_singular[key][0]
    accumulated = weight.to(torch.float64) - W0
    U, S, Vh = torch.linalg.svd(accumulated, full_matrices=False)
    restrained = prune_singular_values(S, original_max, log_base)
    n_restrained = int((S > original_max).sum().item())
    if n_restrained:
        with torch.no_grad():
            weight.copy_((W0 + (U * restrained) @ Vh).to(weight.dtype))
    return {"original_max_singular_value": original_max, "max_singular_value_before": S.max().item(),
            "max_singular_value_after": restrained.max().item(), "restrained": n_restrained}


def rect_filter(delta: torch.Tensor, weight: torch.Tensor, top_fraction: float) -> tuple[torch.Tensor, int]:
    """Δ with all but its top `top_fraction` entries by |Δ| / |W| zeroed; and how many were kept."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"rect_top_fraction must be in (0, 1], got {top_fraction}")
    relative = delta.abs() / weight.to(delta.device, torch.float64).abs().clamp_min(torch.finfo(torch.float64).tiny)
    kept = max(1, math.ceil(round(top_fraction * relative.numel(), 6)))  # 0.07 × 100 is 7, not 7.000000000000001
    mask = torch.zeros(relative.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(relative.flatten(), kept).indices] = True  # exactly `kept` entries, ties or not
    return torch.where(mask.view_as(delta), delta, torch.zeros_like(delta)), kept
