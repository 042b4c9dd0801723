"""The one preservation–memorization (PM) solve behind ROME, MEMIT and EMMET (SPEC §1).

Column keys: K_d, K_c are (d_k, B); residuals R = V_E - W0 K_E are (d_v, B); the update Δ is (d_v, d_k),
added to W in (d_out, d_in) orientation. All arithmetic is float64 on the inputs' device.

Unified form, with the preservation matrix P = λ·C0 + u·I (λ = mom2_update_weight, u = update_norm_lambda):

    Δ = R (K_cᵀ P⁻¹ K_d + ρ I)⁻¹ K_dᵀ P⁻¹

K_d sets the direction of the update, K_c carries the memorization constraint (K_c = K_d except in original
ROME), ρ ≥ 0 is how soft the constraint is. ρ = 0 is the equality Δ K_c = R; for ρ > 0 and K_c = K_d = K
it is the least-squares solution, equal by the push-through identity to R Kᵀ (ρP + K Kᵀ)⁻¹.

How each objective's hparams map to (P, ρ) — objective_params() does this, the algorithms only pick numbers:
- ROME: ρ = 0, B = 1. Original ROME: K_c = bare-prompt key k, K_d = template-averaged key k*, giving
  Δ = (v - W0 k) (P⁻¹k*)ᵀ / (kᵀ P⁻¹ k*); r-ROME passes K_c = K_d = k*. With u = 0, λ cancels
  (the reference uses C0 alone).
- MEMIT: ρ = 1, K_c = K_d = K_E: Δ = R K_Eᵀ (λC0 + uI + K_E K_Eᵀ)⁻¹, the minimiser of
  λ tr(ΔC0Δᵀ) + u‖Δ‖² + ‖(W0 + Δ)K_E - V_E‖².
- EMMET: ρ = emmet_lambda when B > 1, ρ = 0 when B = 1 (the reference adds no ridge then), K_c = K_d = K_E.
  The reference adds emmet_lambda·I to D built from λC0 + uI, which is exactly this ρ; on the unscaled
  D = K_Eᵀ C0⁻¹ K_E (u = 0) it is a ridge of emmet_lambda·λ. Without a ridge λ cancels.

Lifelong regularisers (SPEC §8) change only the preservation matrix:
- Earlier-edit preservation (ENCORE add_prev_edits): P_t = λ·C0 + u·I + S_t, S_t = Σ earlier K Kᵀ.
- Null-space projection (AlphaEdit): the update is restricted to Δ = Δ' Uᵀ, U the eigenvectors of C0 whose
  eigenvalues are below a threshold (so Δk = 0 for every k in the kept eigenspace, where generic text's keys
  live). In those coordinates the same objective is solved with keys UᵀK and preservation UᵀP_tU. For the
  least-squares objective this is exactly AlphaEdit's Δ = R Kᵀ Q ((P_t − uI + K Kᵀ) Q + uI)⁻¹, Q = U Uᵀ
  (multiply out: Q (A Q + uI)⁻¹ = U (UᵀAU + uI)⁻¹ Uᵀ); with λ = 0 and u = L2 it is the paper's formula.

No explicit inverses: P is Cholesky-factorised once per layer (FactorCache; with S_t ≠ 0 it is re-factored
for each batch, see PreservationFactor), the small system is solved with Cholesky/LU; a singular or
ill-conditioned system falls back to an SVD pseudo-solve, recorded in the diagnostics.
"""
import math
from dataclasses import dataclass

import torch

# Above this dimension condition numbers are estimated from the Cholesky diagonal instead of eigvalsh.
EXACT_COND_MAX_DIM = 4096
# Systems with a larger condition number are solved by SVD pseudo-solve, dropping singular values
# below s_max / MAX_COND (LU/Cholesky would keep < 4 significant digits there).
MAX_COND = 1e12
OBJECTIVES = ("rome", "memit", "emmet")


@dataclass(frozen=True)
class ObjectiveParams:
    """What the solver needs for one objective: P = mom2_update_weight·C0 + update_norm_lambda·I, and ρ."""
    mom2_update_weight: float
    update_norm_lambda: float
    rho: float


def objective_params(kind: str, batch_size: int, mom2_update_weight: float,
                     emmet_lambda: float = 0.0, update_norm_lambda: float = 0.0) -> ObjectiveParams:
    """Map ROME/MEMIT/EMMET hparams to (λ, u, ρ) as documented in the module docstring."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind must be one of {OBJECTIVES}, got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if kind == "rome" and batch_size != 1:
        raise ValueError(f"ROME writes one fact per solve (B = 1), got B = {batch_size}; use 'emmet' for batches")
    if emmet_lambda < 0:
        raise ValueError(f"emmet_lambda must be >= 0, got {emmet_lambda}")
    rho = {"rome": 0.0, "memit": 1.0, "emmet": float(emmet_lambda) if batch_size > 1 else 0.0}[kind]
    return ObjectiveParams(float(mom2_update_weight), float(update_norm_lambda), rho)


def _finite_or_none(x: float):
    """JSON has no inf/nan: an infinite condition number (singular matrix) is reported as None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _cond_from_spectrum(values: torch.Tensor) -> float:
    """max |s| / min s, inf when the smallest is not positive."""
    smallest = values.min().item()
    return values.abs().max().item() / smallest if smallest > 0 else math.inf


def _symmetric_cond(A: torch.Tensor, L: torch.Tensor):
    """Condition number of SPD A with Cholesky factor L: exact for small A, else a lower bound from diag(L)²."""
    if A.shape[0] <= EXACT_COND_MAX_DIM:
        return _cond_from_spectrum(torch.linalg.eigvalsh(A)), "eigvalsh_exact"
    diag = L.diagonal()
    return (diag.max() / diag.min()).item() ** 2, "cholesky_diag_lower_bound"


class SvdPseudoSolver:
    """M⁺X through the SVD of M, dropping singular values below s_max / MAX_COND (no matrix is inverted)."""

    def __init__(self, M: torch.Tensor):
        self.U, s, self.Vh = torch.linalg.svd(M)
        keep = s > s.max() / MAX_COND
        self.s_inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        self.rank = int(keep.sum().item())
        self.cond = _cond_from_spectrum(s)

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        return self.Vh.mT @ (self.s_inv[:, None] * (self.U.mT @ X))


def null_space_basis(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """U (d_k, r): orthonormal eigenvectors of C0 (float64 eigh, unscaled) with eigenvalue < threshold."""
    if not threshold > 0:
        raise ValueError(f"nullspace_threshold must be > 0, got {threshold}")
    C0_64 = C0.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((C0_64 + C0_64.mT) / 2)
    basis = eigenvectors[:, eigenvalues < threshold]
    if basis.shape[1] == 0:
        raise ValueError(f"no eigenvalue of C0 is below nullspace_threshold {threshold} (smallest "
                         f"{eigenvalues.min().item():.3g}): the projected update would be zero; raise the threshold")
    return basis


class PreservationFactor:
    """P = λ·C0 + u·I (+ S_t), factorised once; solve(X) = P⁻¹X by cholesky_solve (SVD if P is not PD).

    prev_keys_cov: S_t of earlier edits (add_prev_edits). It changes after every batch, so a factor with it
    is built anew for each batch (one Cholesky of d_k × d_k, exact). A Woodbury update of the cached
    λC0 + uI factor would need every earlier key kept (d_k × N_prev, unbounded) and costs more than
    re-factoring once N_prev passes ~d_k^(2/3); S_t itself is kept as one d_k × d_k matrix.
    basis: U (d_k, r) of a null-space projection; then P is UᵀPU (r × r) and keys must be given as UᵀK.
    """

    def __init__(self, C0: torch.Tensor, mom2_update_weight: float, update_norm_lambda: float = 0.0,
                 prev_keys_cov: torch.Tensor = None, basis: torch.Tensor = None):
        if C0.ndim != 2 or C0.shape[0] != C0.shape[1]:
            raise ValueError(f"C0 must be a square (d_k, d_k) matrix, got shape {tuple(C0.shape)}")
        if mom2_update_weight < 0 or update_norm_lambda < 0 or mom2_update_weight + update_norm_lambda == 0:
            raise ValueError(f"mom2_update_weight and update_norm_lambda must be >= 0 and not both 0, "
                             f"got {mom2_update_weight}, {update_norm_lambda}")
        C0_64 = C0.to(torch.float64)
        if not torch.isfinite(C0_64).all():
            raise ValueError("C0 contains inf/nan (corrupt second-moment statistics?)")
        asym = (C0_64 - C0_64.mT).abs().max().item()
        if asym > 1e-5 * C0_64.abs().max().item():
            raise ValueError(f"C0 must be symmetric (a second moment), max |C0 - C0ᵀ| = {asym:.3g}")
        self.C0 = C0
        self.mom2_update_weight = float(mom2_update_weight)
        self.update_norm_lambda = float(update_norm_lambda)
        self.prev_keys_cov = prev_keys_cov
        self.basis = None if basis is None else basis.to(device=C0.device, dtype=torch.float64)
        self.d_k = C0.shape[0] if basis is None else basis.shape[1]  # the dimension P acts on
        self.device = C0.device
        P = self.matrix()
        L, info = torch.linalg.cholesky_ex(P)
        if info.item() == 0:
            self.cholesky, self.pseudo_solver, self.fallback = L, None, None
            self.cond, self.cond_method = _symmetric_cond(P, L)
        else:
            self.cholesky, self.pseudo_solver = None, SvdPseudoSolver(P)
            self.cond, self.cond_method = self.pseudo_solver.cond, "svd_exact"
            self.fallback = (f"P = λC0 + uI not positive definite (Cholesky failed at minor {info.item()}); "
                             f"SVD pseudo-solve with rank {self.pseudo_solver.rank}/{self.d_k}")

    def matrix(self) -> torch.Tensor:
        """P in float64, rebuilt from C0 (not kept, to halve the memory for large d_k); C0 must stay unchanged."""
        C0_64 = self.C0.to(torch.float64)
        P = self.mom2_update_weight * (C0_64 + C0_64.mT) / 2
        if self.prev_keys_cov is not None:
            P = P + self.prev_keys_cov.to(device=self.device, dtype=torch.float64)
        if self.basis is not None:
            P = self.basis.mT @ P @ self.basis
        return P + self.update_norm_lambda * torch.eye(self.d_k, dtype=torch.float64, device=self.device)

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(torch.float64)
        if self.cholesky is not None:
            return torch.cholesky_solve(X, self.cholesky)
        return self.pseudo_solver.solve(X)


class FactorCache:
    """Explicit per-run cache of PreservationFactor, keyed by (layer, λ, u, C0 identity and version).

    Entries hold a reference to C0, so its id cannot be reused by another tensor while cached; an in-place
    change of C0 bumps its version and misses. Drop the cache (or call clear()) when the model changes.
    """

    def __init__(self):
        self._entries = {}

    def get(self, layer_name: str, C0: torch.Tensor, mom2_update_weight: float,
            update_norm_lambda: float = 0.0, basis: torch.Tensor = None) -> PreservationFactor:
        """The factor of λC0 + uI (in the null-space coordinates of `basis` when given); `basis` is held
        by the entry like C0, so its id stays unique while cached."""
        key = (layer_name, float(mom2_update_weight), float(update_norm_lambda), id(C0), C0._version,
               None if basis is None else (id(basis), basis._version))
        if key not in self._entries:
            self._entries[key] = (PreservationFactor(C0, mom2_update_weight, update_norm_lambda, basis=basis),
                                  basis)
        return self._entries[key][0]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _solve_system(M: torch.Tensor, X: torch.Tensor, symmetric: bool, name: str):
    """M⁻¹X by Cholesky (symmetric M) or LU; SVD pseudo-solve when that fails or cond(M) > MAX_COND.

    Returns (Y, cond, cond_method, fallback reason or None).
    """
    reason = None
    if symmetric:
        L, info = torch.linalg.cholesky_ex(M)
        if info.item() != 0:
            reason = f"Cholesky of {name} failed at minor {info.item()}"
        else:
            cond, cond_method = _symmetric_cond(M, L)
    else:
        cond, cond_method = _cond_from_spectrum(torch.linalg.svdvals(M)), "svd_exact"
        LU, pivots, info = torch.linalg.lu_factor_ex(M)
        if info.item() != 0:
            reason = f"LU of {name} found an exactly zero pivot"
    if reason is None and cond > MAX_COND:
        reason = f"cond({name}) = {cond:.3g} > {MAX_COND:.0e}"
    if reason is None:
        Y = torch.cholesky_solve(X, L) if symmetric else torch.linalg.lu_solve(LU, pivots, X)
        if torch.isfinite(Y).all():
            return Y, cond, cond_method, None
        reason = f"solve of {name} gave non-finite values"
    pseudo = SvdPseudoSolver(M)
    return pseudo.solve(X), pseudo.cond, "svd_exact", f"{reason}; SVD pseudo-solve with rank {pseudo.rank}/{M.shape[0]}"


def _check_inputs(R, K_d, K_c, factor, rho):
    for name, t in (("R", R), ("K_d", K_d), ("K_c", K_c)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (column keys / residuals), got shape {tuple(t.shape)}")
        if t.device != factor.device:
            raise ValueError(f"{name} is on {t.device} but the preservation factor (C0) is on {factor.device}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains inf/nan")
    d_k = factor.d_k if factor.basis is None else factor.basis.shape[0]
    if K_d.shape[0] != d_k:
        raise ValueError(f"keys have d_k = {K_d.shape[0]} but C0 is {d_k} x {d_k}")
    if K_c.shape != K_d.shape:
        raise ValueError(f"K_c {tuple(K_c.shape)} must have the shape of K_d {tuple(K_d.shape)}")
    if R.shape[1] != K_d.shape[1]:
        raise ValueError(f"R has {R.shape[1]} columns but there are {K_d.shape[1]} keys (one residual per key)")
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")


def solve_update(R: torch.Tensor, K_d: torch.Tensor, factor: PreservationFactor, rho: float,
                 K_c: torch.Tensor = None, form: str = "auto"):
    """Δ = R (K_cᵀ P⁻¹ K_d + ρI)⁻¹ K_dᵀ P⁻¹ in float64, and JSON-ready diagnostics.

    form "bxb" solves the B×B system D = K_cᵀ P⁻¹ K_d + ρI; "dkxdk" (ρ > 0, K_c = K_d) solves
    A = ρP + K Kᵀ; "auto" takes B×B when B < d_k, when ρ = 0 or when K_c differs from K_d.
    """
    same_keys = K_c is None or K_c is K_d
    K_c = K_d if K_c is None else K_c
    _check_inputs(R, K_d, K_c, factor, rho)
    R, K_d, K_c = (t.to(torch.float64) for t in (R, K_d, K_c))
    rho = float(rho)
    if factor.basis is not None:  # solve for Δ' in the null-space coordinates; Δ = Δ' Uᵀ below
        full_K_c = K_c
        K_d = factor.basis.mT @ K_d
        K_c = K_d if same_keys else factor.basis.mT @ K_c
    B, d_k = K_d.shape[1], factor.d_k
    if form == "auto":
        form = "bxb" if (B < d_k or rho == 0 or not same_keys) else "dkxdk"
    if form not in ("bxb", "dkxdk"):
        raise ValueError(f"form must be 'auto', 'bxb' or 'dkxdk', got {form!r}")
    if form == "dkxdk" and not (rho > 0 and same_keys):
        raise ValueError("form 'dkxdk' needs rho > 0 and K_c = K_d (it is the least-squares push-through form)")

    cond_D = cond_A = None
    if form == "bxb":
        # Δᵀ = P⁻¹K_d D⁻ᵀ Rᵀ, and Dᵀ = K_dᵀ P⁻¹ K_c + ρI since P is symmetric.
        Pinv_K_d = factor.solve(K_d)
        D_T = Pinv_K_d.mT @ K_c + rho * torch.eye(B, dtype=torch.float64, device=K_d.device)
        if same_keys:
            D_T = (D_T + D_T.mT) / 2
        Y, cond, cond_method, fallback = _solve_system(D_T, R.mT, same_keys, "D")
        delta = (Pinv_K_d @ Y).mT
        cond_D = cond
    else:
        A = rho * factor.matrix() + K_d @ K_d.mT
        Y, cond, cond_method, fallback = _solve_system(A, K_d @ R.mT, True, "A = rho P + K Kᵀ")
        delta = Y.mT
        cond_A = cond

    if factor.basis is not None:
        delta, K_c = delta @ factor.basis.mT, full_K_c
    residual = torch.linalg.norm(delta @ K_c - R).item()
    R_norm = torch.linalg.norm(R).item()
    fallbacks = [f for f in (factor.fallback, fallback) if f is not None]
    diagnostics = {
        "form": form,
        "B": B,
        "d_k": K_c.shape[0],
        "projected_dim": None if factor.basis is None else d_k,
        "prev_edits": factor.prev_keys_cov is not None,
        "d_v": R.shape[0],
        "rho": rho,
        "mom2_update_weight": factor.mom2_update_weight,
        "update_norm_lambda": factor.update_norm_lambda,
        "cond_P": _finite_or_none(factor.cond),
        "cond_P_method": factor.cond_method,
        "cond_D": None if cond_D is None else _finite_or_none(cond_D),
        "cond_A": None if cond_A is None else _finite_or_none(cond_A),
        "cond_system_method": cond_method,
        "residual": residual,
        "residual_rel": residual / R_norm if R_norm > 0 else None,
        "delta_norm": torch.linalg.norm(delta).item(),
        "fallback": "; ".join(fallbacks) if fallbacks else None,
    }
    return delta, diagnostics
