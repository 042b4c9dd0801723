"""The PM solver against closed forms computed independently here (torch.linalg.solve / lstsq), SPEC §1."""
import json

import pytest
import torch

from algs import pm_solver
from algs.pm_solver import FactorCache, PreservationFactor, objective_params, solve_update

D_K, D_V = 48, 16
F64 = torch.float64


def make_c0(seed=0, n=4000, dead_dims=0):
    """C0 = K0 K0ᵀ / n from an anisotropic random key sample; `dead_dims` key dimensions never active."""
    g = torch.Generator().manual_seed(seed)
    K0 = torch.linspace(0.3, 3.0, D_K, dtype=F64)[:, None] * torch.randn(D_K, n, generator=g, dtype=F64)
    K0[:dead_dims] = 0
    return K0 @ K0.mT / n


def make_batch(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D_K, B, generator=g, dtype=F64), torch.randn(D_V, B, generator=g, dtype=F64)


def close(a, b, rtol=1e-10):
    return torch.linalg.norm(a - b).item() <= rtol * torch.linalg.norm(b).item()


# Independent closed forms (SPEC §1 table), written with torch.linalg.solve only.
def rome_direct(r, k_c, k_d, C0):
    C0inv_kd = torch.linalg.solve(C0, k_d)
    return r @ C0inv_kd.mT / (k_c.mT @ C0inv_kd)


def memit_direct(R, K, C0, lam):
    return torch.linalg.solve(lam * C0 + K @ K.mT, K @ R.mT).mT


def emmet_direct(R, K, C0, ridge=0.0):
    C0inv_K = torch.linalg.solve(C0, K)
    D = K.mT @ C0inv_K + ridge * torch.eye(K.shape[1], dtype=F64)
    return torch.linalg.solve(D, R, left=False) @ C0inv_K.mT


def preservation_cost(delta, C0):
    return torch.trace(delta @ C0 @ delta.mT).item()


def test_objective_params_mapping():
    assert objective_params("rome", 1, 15000.0).rho == 0.0
    memit = objective_params("memit", 7, 20000.0, update_norm_lambda=0.01)
    assert memit == pm_solver.ObjectiveParams(20000.0, 0.01, 1.0)
    assert objective_params("emmet", 1, 10000.0, emmet_lambda=0.1).rho == 0.0  # reference: no ridge at B = 1
    assert objective_params("emmet", 2, 10000.0, emmet_lambda=0.1).rho == 0.1
    with pytest.raises(ValueError, match="ROME writes one fact"):
        objective_params("rome", 2, 1.0)
    with pytest.raises(ValueError, match="objective kind"):
        objective_params("fastmemit", 1, 1.0)


def test_emmet_batch_of_one_is_rome_closed_form():
    C0 = make_c0()
    k, r = make_batch(1)
    params = objective_params("emmet", 1, 10000.0, emmet_lambda=0.1)
    factor = PreservationFactor(C0, params.mom2_update_weight, params.update_norm_lambda)
    delta, diag = solve_update(r, k, factor, params.rho)
    assert delta.shape == (D_V, D_K)
    assert close(delta, rome_direct(r, k, k, C0))
    assert diag["residual_rel"] < 1e-12 and diag["fallback"] is None


def test_original_rome_distinct_constraint_and_direction_keys():
    C0 = make_c0()
    K, R = make_batch(2)
    k_c, k_d, r = K[:, :1], K[:, 1:] + 0.5 * K[:, :1], R[:, :1]
    factor = PreservationFactor(C0, 15000.0)
    delta, diag = solve_update(r, k_d, factor, 0.0, K_c=k_c)
    assert close(delta, rome_direct(r, k_c, k_d, C0))
    assert close(delta @ k_c, r)
    # The update lies along C0⁻¹k_d, not C0⁻¹k_c.
    assert not close(delta, rome_direct(r, k_c, k_c, C0), rtol=1e-3)
    assert diag["form"] == "bxb" and diag["cond_D"] == pytest.approx(1.0)


def test_equality_constraint_holds_and_matches_emmet():
    C0 = make_c0()
    K, R = make_batch(8)
    factor = PreservationFactor(C0, 10000.0)
    delta, diag = solve_update(R, K, factor, 0.0)
    assert torch.linalg.norm(delta @ K - R).item() < 1e-10
    assert diag["residual"] < 1e-10
    assert close(delta, emmet_direct(R, K, C0))


def test_memit_direct_form_woodbury_and_both_solver_forms():
    C0 = make_c0()
    K, R = make_batch(8)
    lam = 5.0
    expected = memit_direct(R, K, C0, lam)
    params = objective_params("memit", 8, lam)
    factor = PreservationFactor(C0, params.mom2_update_weight)
    bxb, diag_bxb = solve_update(R, K, factor, params.rho, form="bxb")
    dkxdk, diag_dkxdk = solve_update(R, K, factor, params.rho, form="dkxdk")
    assert close(bxb, expected) and close(dkxdk, expected)
    assert diag_bxb["form"] == "bxb" and diag_dkxdk["form"] == "dkxdk"
    assert diag_bxb["cond_D"] is not None and diag_dkxdk["cond_A"] is not None
    # Woodbury: MEMIT(λ) is EMMET on the unscaled C0 with ridge λ on D.
    for form in ("bxb", "dkxdk"):
        emmet_ridge, _ = solve_update(R, K, PreservationFactor(C0, 1.0), rho=lam, form=form)
        assert close(emmet_ridge, expected)
    assert close(emmet_direct(R, K, C0, ridge=lam), expected)


def test_emmet_ridge_mapping_matches_reference_scaling():
    """Reference EMMET: D from λC0 + uI, plus emmet_lambda·I; equals ridge emmet_lambda·λ on the unscaled D."""
    C0 = make_c0()
    K, R = make_batch(6)
    lam, e, u = 50.0, 0.1, 0.2
    params = objective_params("emmet", 6, lam, emmet_lambda=e, update_norm_lambda=u)
    delta, _ = solve_update(R, K, PreservationFactor(C0, lam, u), params.rho)
    P = lam * C0 + u * torch.eye(D_K, dtype=F64)
    assert close(delta, emmet_direct(R, K, P, ridge=e))
    no_norm, _ = solve_update(R, K, PreservationFactor(C0, lam), params.rho)
    assert close(no_norm, emmet_direct(R, K, C0, ridge=e * lam))


def test_auto_form_choice_and_agreement_when_batch_exceeds_dk():
    C0 = make_c0()
    K, R = make_batch(60)
    factor = PreservationFactor(C0, 3.0)
    auto, diag = solve_update(R, K, factor, 1.0)
    assert diag["form"] == "dkxdk"
    bxb, diag_bxb = solve_update(R, K, factor, 1.0, form="bxb")
    assert close(auto, bxb, rtol=1e-9) and close(auto, memit_direct(R, K, C0, 3.0))
    assert solve_update(R[:, :5], K[:, :5], factor, 1.0)[1]["form"] == "bxb"
    assert solve_update(R, K, factor, 0.0)[1]["form"] == "bxb"


def test_memit_gradient_vanishes_at_solution():
    C0 = make_c0()
    K, R = make_batch(8)
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(D_V, D_K, generator=g, dtype=F64)
    V = W0 @ K + R
    lam, u = 4.0, 0.3
    delta, _ = solve_update(R, K, PreservationFactor(C0, lam, u), objective_params("memit", 8, lam).rho)

    def objective_and_grad(d):
        d = d.clone().requires_grad_(True)
        f = lam * torch.trace(d @ C0 @ d.mT) + u * (d ** 2).sum() + ((W0 + d) @ K - V).pow(2).sum()
        f.backward()
        return f.item(), torch.linalg.norm(d.grad).item()

    f_star, grad_star = objective_and_grad(delta)
    assert grad_star < 1e-9 * torch.linalg.norm(R).item()
    for seed in range(3):
        perturbed = delta + 1e-2 * torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        f_p, grad_p = objective_and_grad(perturbed)
        assert f_p > f_star and grad_p > 1e3 * grad_star


def test_lambda_limits():
    C0 = make_c0()
    K, R = make_batch(8)
    norms = [solve_update(R, K, PreservationFactor(C0, lam), 1.0)[1]["delta_norm"] for lam in (1.0, 1e3, 1e6, 1e12)]
    assert all(a > b for a, b in zip(norms, norms[1:])) and norms[-1] < 1e-9 * norms[0]
    # λ -> 0: the exact solution of least C0-norm (EMMET), and with C0 = I the Frobenius minimum-norm one.
    tiny, _ = solve_update(R, K, PreservationFactor(C0, 1e-9), 1.0)
    assert close(tiny, emmet_direct(R, K, C0), rtol=1e-6)
    assert close(tiny @ K, R, rtol=1e-6)
    eye_tiny, _ = solve_update(R, K, PreservationFactor(torch.eye(D_K, dtype=F64), 1e-9), 1.0)
    min_norm = torch.linalg.lstsq(K.mT, R.mT, driver="gelsd").solution.mT
    assert close(eye_tiny, min_norm, rtol=1e-6)


def test_closed_form_minimises_preservation_cost_among_feasible_updates():
    C0 = make_c0()
    K, R = make_batch(8)
    delta, _ = solve_update(R, K, PreservationFactor(C0, 1.0), 0.0)
    projector = K @ torch.linalg.solve(K.mT @ K, K.mT)  # onto span(K)
    best = preservation_cost(delta, C0)
    for seed in range(5):
        G = torch.randn(D_V, D_K, generator=torch.Generator().manual_seed(seed), dtype=F64)
        M = G - G @ projector  # M K = 0: delta + M is still feasible
        assert torch.linalg.norm(M @ K).item() < 1e-10
        assert preservation_cost(delta + M, C0) > best
    costs = [preservation_cost(solve_update(R, K, PreservationFactor(C0, lam), 1.0)[0], C0)
             for lam in (0.01, 0.1, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(costs, costs[1:]))


def test_update_norm_lambda_fixes_singular_c0():
    C0 = make_c0(dead_dims=3)
    K, R = make_batch(4)
    singular = PreservationFactor(C0, 100.0)
    assert singular.fallback is not None and "not positive definite" in singular.fallback
    delta_pinv, diag_pinv = solve_update(R, K, singular, 0.0)
    assert torch.isfinite(delta_pinv).all() and "not positive definite" in diag_pinv["fallback"]
    u = 1e-3
    fixed = PreservationFactor(C0, 100.0, u)
    assert fixed.fallback is None
    delta, diag = solve_update(R, K, fixed, 0.0)
    assert torch.isfinite(delta).all() and diag["fallback"] is None
    assert close(delta, emmet_direct(R, K, 100.0 * C0 + u * torch.eye(D_K, dtype=F64)))
    assert close(delta @ K, R)


def test_duplicate_keys_fall_back_to_pseudo_solve():
    C0 = make_c0()
    K, R = make_batch(4)
    K = torch.cat([K, K[:, :1]], dim=1)
    factor = PreservationFactor(C0, 1.0)
    # Consistent targets for the duplicated key: still met exactly.
    R_same = torch.cat([R, R[:, :1]], dim=1)
    delta, diag = solve_update(R_same, K, factor, 0.0)
    assert torch.isfinite(delta).all() and "D" in diag["fallback"]
    assert close(delta @ K, R_same, rtol=1e-8)
    # Conflicting targets: the pseudo-solve writes their mean, keeps the other keys exact.
    R_diff = torch.cat([R, R[:, 1:2]], dim=1)
    delta, diag = solve_update(R_diff, K, factor, 0.0)
    assert diag["fallback"] is not None
    mean = (R_diff[:, 0] + R_diff[:, 4]) / 2
    assert close(delta @ K[:, 0], mean, rtol=1e-8) and close(delta @ K[:, 4], mean, rtol=1e-8)
    assert close(delta @ K[:, 1:4], R_diff[:, 1:4], rtol=1e-8)
    # Non-symmetric D (K_c ≠ K_d) that is singular: LU path falls back too.
    K_c = torch.cat([K[:, :4], K[:, :1] + 0.0], dim=1)
    K_d = K + 0.1 * torch.roll(K, 1, dims=1)
    delta, diag = solve_update(R_same, K_d, factor, 0.0, K_c=K_c)
    assert torch.isfinite(delta).all() and diag["fallback"] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs_use_float64_math(dtype):
    C0 = make_c0().to(dtype)
    K, R = (t.to(dtype) for t in make_batch(6))
    delta, _ = solve_update(R, K, PreservationFactor(C0, 2.0), 1.0)
    assert delta.dtype == F64
    C0_64, K_64, R_64 = (t.to(F64) for t in (C0, K, R))
    assert close(delta, memit_direct(R_64, K_64, C0_64, 2.0), rtol=1e-12)


def test_diagnostics_are_json_and_correct():
    C0 = make_c0()
    K, R = make_batch(8)
    factor = PreservationFactor(C0, 7.0, 0.1)
    P = 7.0 * C0 + 0.1 * torch.eye(D_K, dtype=F64)
    cases = [solve_update(R, K, factor, 1.0), solve_update(R, K, factor, 1.0, form="dkxdk"),
             solve_update(torch.cat([R, R[:, :1] + 1], 1), torch.cat([K, K[:, :1]], 1), factor, 0.0)]
    for delta, diag in cases:
        json.dumps(diag, allow_nan=False)
        assert all(isinstance(v, (int, float, str, bool, type(None))) for v in diag.values())
        assert diag["cond_P"] == pytest.approx(torch.linalg.cond(P).item(), rel=1e-8)
        assert diag["cond_P_method"] == "eigvalsh_exact"
        assert diag["delta_norm"] == pytest.approx(torch.linalg.norm(delta).item())
    delta, diag = cases[0]
    D = K.mT @ torch.linalg.solve(P, K) + torch.eye(8, dtype=F64)
    assert diag["cond_D"] == pytest.approx(torch.linalg.cond(D).item(), rel=1e-8)
    assert diag["residual"] == pytest.approx(torch.linalg.norm(delta @ K - R).item())
    assert diag["residual_rel"] == pytest.approx(diag["residual"] / torch.linalg.norm(R).item())
    assert (diag["B"], diag["d_k"], diag["d_v"], diag["rho"]) == (8, D_K, D_V, 1.0)


def test_condition_estimate_for_large_dk_is_a_lower_bound(monkeypatch):
    C0 = make_c0()
    monkeypatch.setattr(pm_solver, "EXACT_COND_MAX_DIM", 8)
    factor = PreservationFactor(C0, 1.0)
    assert factor.cond_method == "cholesky_diag_lower_bound"
    assert 1.0 < factor.cond <= torch.linalg.cond(C0).item() * (1 + 1e-10)


def test_factor_cache_reuses_and_invalidates():
    cache = FactorCache()
    C0 = make_c0()
    first = cache.get("layer.5", C0, 10.0)
    assert cache.get("layer.5", C0, 10.0) is first
    assert cache.get("layer.5", C0, 20.0) is not first
    assert cache.get("layer.6", C0, 10.0) is not first
    C0.mul_(2.0)  # in-place change: the old factorisation must not be reused
    refreshed = cache.get("layer.5", C0, 10.0)
    assert refreshed is not first
    k, r = make_batch(1)
    assert close(solve_update(r, k, refreshed, 0.0)[0] @ k, r)
    cache.clear()
    assert len(cache) == 0


def test_bad_inputs_raise_clear_errors():
    factor = PreservationFactor(make_c0(), 1.0)
    K, R = make_batch(3)
    with pytest.raises(ValueError, match="d_k"):
        solve_update(R, K[:10], factor, 0.0)
    with pytest.raises(ValueError, match="columns"):
        solve_update(R[:, :2], K, factor, 0.0)
    with pytest.raises(ValueError, match="dkxdk"):
        solve_update(R, K, factor, 0.0, form="dkxdk")
    with pytest.raises(ValueError, match="rho"):
        solve_update(R, K, factor, -1.0)
    with pytest.raises(ValueError, match="square"):
        PreservationFactor(torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="not both 0"):
        PreservationFactor(make_c0(), 0.0, 0.0)
    with pytest.raises(ValueError, match="symmetric"):
        PreservationFactor(torch.triu(torch.ones(4, 4)), 1.0)
