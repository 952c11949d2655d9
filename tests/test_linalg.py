"""Lanczos, power iteration, CG, MINRES, SLQ and low-rank approximations against dense
float64 references with known spectra."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import hesse
from conftest import make_data, mlp, ref_hessian
from hesse.linalg import (
    InverseOperator,
    NotConvergedError,
    cg,
    lanczos,
    low_rank,
    minres,
    power_iteration,
    spectral_density,
)


def with_spectrum(lam, seed=0):
    lam = torch.as_tensor(lam, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    return Q @ torch.diag(lam) @ Q.T


def _rand(n, seed, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


SPECTRA = {
    "clustered_top": torch.cat([torch.tensor([10.0, 9.99, 9.98]), _rand(197, 1)]),
    "large_gap": torch.cat([torch.tensor([100.0]), _rand(199, 2)]),
    "indefinite": torch.cat([torch.tensor([5.0, -4.0, 3.0, -2.5]), _rand(196, 3, -1, 1)]),
    "low_rank_plus_noise": torch.cat([torch.tensor([50.0, 20, 10, 5]), 1e-3 * _rand(196, 4)]),
    "singular": torch.cat([torch.tensor([7.0, 3.0, 1.0]), torch.zeros(197)]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_finds_the_extreme_eigenvalues(name, which):
    lam = SPECTRA[name]
    A = with_spectrum(lam)
    exact = np.linalg.eigh(A.numpy())[0]
    k = 3
    r = lanczos(A, k=k, which=which, tol=1e-8, max_iter=200, seed=0)
    assert r.success, r.message
    want = {
        "largest": exact[::-1][:k],
        "smallest": exact[:k],
        "both": np.concatenate([exact[:k], exact[::-1][:k]]),
    }[which]
    np.testing.assert_allclose(r.eigenvalues.numpy(), want, rtol=1e-6, atol=1e-8 * exact.max())
    # residuals are certificates: each is the true |A y - theta y|
    true_res = torch.linalg.vector_norm(A @ r.eigenvectors - r.eigenvectors * r.eigenvalues, dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=1e-3, atol=1e-9)
    assert torch.allclose(
        r.eigenvectors.T @ r.eigenvectors,
        torch.eye(r.eigenvalues.numel(), dtype=torch.float64),
        atol=1e-8,
    )


def test_lanczos_needs_few_products_on_a_gap_and_reports_non_convergence():
    A = with_spectrum(SPECTRA["large_gap"])
    r = lanczos(A, k=1, tol=1e-6, seed=0)
    assert r.success and r.matvecs <= 12
    hard = lanczos(
        with_spectrum(SPECTRA["clustered_top"]),
        k=1,
        which="smallest",
        tol=1e-10,
        max_iter=5,
        seed=0,
    )
    assert not hard.success and hard.status == "max_iterations" and hard.matvecs == 5
    with pytest.raises(NotConvergedError, match="raise max_iter"):
        hard.raise_for_status()


def test_failure_messages_say_what_to_change_from_the_shared_vocabulary():
    # Each ending's advice is the one template of hesse.linalg.Status, in the routine's
    # names (cg's tolerance is rtol); a non-finite product never advises more iterations.
    from hesse.linalg import Status

    A = with_spectrum(torch.logspace(-2, 2, 30, dtype=torch.float64))
    b = torch.ones(30, dtype=torch.float64)
    r = cg(A, b, max_iter=2)
    assert r.status == Status.MAX_ITERATIONS
    assert "not converged: raise max_iter or loosen rtol" in r.message
    r = cg(with_spectrum(SPECTRA["indefinite"]), torch.ones(200, dtype=torch.float64))
    assert r.status == Status.NEGATIVE_CURVATURE
    assert Status.NEGATIVE_CURVATURE.advice() in r.message and "minres" in r.message
    r = cg(A, b, M=-torch.eye(30, dtype=torch.float64))  # a negative definite preconditioner
    assert r.status == Status.BREAKDOWN
    assert "pass a positive definite preconditioner, or none" in r.message
    hard = lanczos(A, k=1, which="smallest", tol=1e-12, max_iter=3, seed=0)
    assert hard.status == Status.MAX_ITERATIONS and "raise max_iter or loosen tol" in hard.message

    # (a non-finite product raises NonFiniteError; a Ritz value that overflows ends the run)
    bad = dataclasses.replace(hard, status=Status.NON_FINITE)
    assert not bad.success and "not finite" in bad.message and "max_iter" not in bad.message


def test_lanczos_is_seeded_and_keeps_dtype():
    A = with_spectrum(SPECTRA["indefinite"]).float()
    a = lanczos(A, k=2, seed=3)
    b = lanczos(A, k=2, seed=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.eigenvalues.dtype == torch.float32 and a.eigenvectors.dtype == torch.float32


def test_power_iteration_needs_many_more_products_than_lanczos():
    A = with_spectrum(torch.cat([torch.tensor([10.0, 8.0]), _rand(198, 7)]))
    p = power_iteration(A, tol=1e-4, max_iter=5000, seed=0)
    lz = lanczos(A, k=1, tol=1e-4, seed=0)
    assert p.success and lz.success
    # the residual certifies an eigenvalue within tol * |theta|
    assert abs(float(p.eigenvalues[0]) - 10.0) <= float(p.residuals[0]) + 1e-12
    assert abs(float(lz.eigenvalues[0]) - 10.0) <= float(lz.residuals[0]) + 1e-12
    assert 3 * lz.matvecs < p.matvecs


def test_lanczos_on_a_model_hessian():
    model = mlp()
    X, y = make_data("ce")
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    exact = np.linalg.eigh(ref_hessian(model, nn.CrossEntropyLoss(), X, y).numpy())[0]
    r = hesse.eigenvalues(H, k=2, which="both", tol=1e-6, max_iter=122, seed=0)
    assert r.success
    np.testing.assert_allclose(
        r.eigenvalues.numpy(), [*exact[:2], *exact[::-1][:2]], rtol=1e-5, atol=1e-9
    )


def test_cg_solves_spd_systems_with_and_without_preconditioner():
    A = with_spectrum(torch.logspace(-2, 2, 80, dtype=torch.float64))
    b = torch.ones(80, dtype=torch.float64)
    x_ref = torch.linalg.solve(A, b)
    plain = cg(A, b, rtol=1e-10, max_iter=500)
    assert plain.success
    torch.testing.assert_close(plain.x, x_ref, rtol=1e-7, atol=1e-9)
    D = torch.diag(torch.logspace(-3, 3, 80, dtype=torch.float64))
    B = D.sqrt() @ with_spectrum(torch.linspace(1, 2, 80)) @ D.sqrt()
    pre = cg(B, b, M=torch.diagonal(B), rtol=1e-10, max_iter=500)
    nopre = cg(B, b, rtol=1e-10, max_iter=500)
    assert pre.success and pre.iterations < nopre.iterations / 3
    torch.testing.assert_close(pre.x, torch.linalg.solve(B, b), rtol=1e-6, atol=1e-9)
    warm = cg(A, b, x0=x_ref, rtol=1e-8)
    assert warm.success and warm.iterations == 0 and warm.matvecs == 1


def test_cg_detects_negative_curvature_and_steihaug_stays_in_the_region():
    A = with_spectrum(SPECTRA["indefinite"])
    b = torch.ones(200, dtype=torch.float64)
    r = cg(A, b)
    assert r.status == "negative_curvature" and not r.success
    d = r.direction
    assert float(d @ A @ d) <= 0 and r.curvature == pytest.approx(float(d @ A @ d / (d @ d)))
    tr = cg(A, b, radius=0.5)
    assert tr.status in ("negative_curvature", "boundary")
    assert float(torch.linalg.vector_norm(tr.x)) == pytest.approx(0.5, rel=1e-10)
    # the quadratic model decreases along the Steihaug step
    assert float(0.5 * tr.x @ A @ tr.x - b @ tr.x) < 0
    small = cg(with_spectrum(SPECTRA["large_gap"] + 1), b, radius=1e6, rtol=1e-10, max_iter=400)
    assert small.success  # the unconstrained solution is inside: plain CG


def test_minres_on_indefinite_and_singular_systems():
    A = with_spectrum(SPECTRA["indefinite"])
    b = torch.linspace(-1, 1, 200, dtype=torch.float64)
    r = minres(A, b, rtol=1e-10)
    assert r.success
    torch.testing.assert_close(A @ r.x, b, rtol=0, atol=1e-8)
    S = with_spectrum(SPECTRA["singular"])
    bs = S @ torch.ones(200, dtype=torch.float64)  # consistent
    rs = minres(S, bs, rtol=1e-10)
    assert rs.success
    torch.testing.assert_close(S @ rs.x, bs, rtol=0, atol=1e-8)
    x_ls = torch.linalg.pinv(S) @ bs  # MINRES from 0 gives the minimum-norm solution
    torch.testing.assert_close(rs.x, x_ls, rtol=1e-6, atol=1e-8)


def test_spectral_density_matches_the_histogram_of_exact_eigenvalues():
    lam = torch.cat(
        [
            0.1 * torch.randn(250, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
            5 + _rand(50, 5),
        ]
    )
    A = with_spectrum(lam)
    r = spectral_density(A, num_probes=20, steps=40, seed=0)
    torch.testing.assert_close(
        torch.trapezoid(r.density, r.grid), torch.tensor(1.0, dtype=torch.float64)
    )
    cdf = torch.cumulative_trapezoid(r.density, r.grid)
    for t in (-0.2, 0.0, 1.0, 5.5, 6.2):
        i = int((r.grid > t).nonzero()[0])
        assert abs(float(cdf[i - 1]) - float((lam <= t).double().mean())) < 0.05, t
    assert r.moments(1) == pytest.approx(float(lam.mean()), rel=0.05)
    assert r.moments(2) == pytest.approx(float((lam**2).mean()), rel=0.05)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(20, dtype=torch.float64))
    assert r.matvecs == 20 * 40
    assert r.success and r.raise_for_status() is r
    assert "20 probes of 40 Lanczos steps (800 products)" in r.message


def test_spectral_density_reports_a_non_finite_operator():
    from hesse.linalg import NotConvergedError
    from hesse.operators import PointHessian

    # finite products whose Lanczos recurrence overflows (squares of 1e300)
    A = PointHessian(lambda V: V * 1e300, 6, torch.float64, torch.device("cpu"))
    r = spectral_density(A, num_probes=2, steps=4, seed=0)
    assert r.status == "non_finite" and not r.success
    assert "not finite" in r.message and "the data and the dtype" in r.message
    with pytest.raises(NotConvergedError, match="not finite"):
        r.raise_for_status()


@pytest.mark.parametrize("method", ["eigen", "nystrom"])
def test_low_rank_approximations(method):
    A = with_spectrum(SPECTRA["low_rank_plus_noise"])
    L = low_rank(hesse.DenseOperator(A, psd=True), 4, method, seed=0)
    assert isinstance(L, hesse.LowRankOperator) and L.rank == 4
    best = with_spectrum(torch.cat([torch.tensor([50.0, 20, 10, 5]), torch.zeros(196)]))
    err = float(torch.linalg.matrix_norm(L.to_dense() - A, ord=2))
    # the best rank-4 error is 1e-3 (the noise level); Nyström from 14 random products pays
    # for the tail of 196 noise eigenvalues (Tropp et al. 2017, Thm 4.1): about 10x more
    assert err < (3e-3 if method == "eigen" else 2e-2)
    assert float(torch.linalg.matrix_norm(L.to_dense() - best)) < 0.05
    x = torch.randn(200, dtype=torch.float64)
    Li = L.damped_inverse(0.5)
    torch.testing.assert_close(Li @ (L.damped(0.5) @ x), x)


def test_nystrom_refuses_an_operator_not_known_to_be_psd():
    with pytest.raises(ValueError, match="positive semidefinite"):
        low_rank(with_spectrum(SPECTRA["indefinite"]), 3, "nystrom")


def test_inverse_operator_solves_and_raises_when_cg_does_not_converge():
    A = with_spectrum(torch.logspace(-1, 1, 60, dtype=torch.float64))
    Inv = InverseOperator(A, damping=0.5, rtol=1e-10)
    B = torch.randn(60, 3, dtype=torch.float64)
    torch.testing.assert_close(Inv @ B, torch.linalg.solve(A + 0.5 * torch.eye(60), B))
    starved = InverseOperator(A, max_iter=2)
    with pytest.raises(NotConvergedError, match="raise max_iter"):
        starved @ B[:, 0]


def test_bad_arguments_get_clear_errors():
    A = with_spectrum(SPECTRA["large_gap"])
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(A, which="top")
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        lanczos(A, k=0)
    with pytest.raises(ValueError, match=r"b must be a tensor of shape \(200,\)"):
        cg(A, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="hesse operator .* or a square"):
        lanczos([[1.0]])
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))


def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue():
    lam = torch.cat([torch.ones(5, dtype=torch.float64), torch.arange(2.0, 17.0).double()])
    r = lanczos(with_spectrum(lam), k=3, which="smallest", tol=1e-8, seed=0)
    assert r.success
    torch.testing.assert_close(r.eigenvalues, torch.ones(3, dtype=torch.float64))
    # a start vector inside an invariant subspace does not fool it either
    D = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    v0 = torch.zeros(10, dtype=torch.float64)
    v0[:2] = 1.0
    assert float(lanczos(D, k=1, v0=v0, tol=1e-8).eigenvalues[0]) == pytest.approx(10.0)


def test_minres_stops_at_a_least_squares_solution_of_an_inconsistent_system():
    lam = torch.linspace(-3, 5, 30, dtype=torch.float64)
    lam[5] = 0.0
    A = with_spectrum(lam)
    b = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = minres(A, b, rtol=1e-8)
    best = float(torch.linalg.vector_norm(b - A @ torch.linalg.pinv(A) @ b))
    assert r.success
    assert float(torch.linalg.vector_norm(b - A @ r.x)) == pytest.approx(best, rel=1e-6)
    assert r.residual_norm == pytest.approx(best, rel=1e-6)


def test_cg_refuses_a_nan_preconditioner_and_a_preconditioned_trust_region():
    A = with_spectrum(torch.linspace(1, 2, 10))
    b = torch.ones(10, dtype=torch.float64)
    M = torch.ones(10, dtype=torch.float64)
    M[3] = float("nan")
    with pytest.raises(ValueError, match="positive and finite"):
        cg(A, b, M=M)
    with pytest.raises(ValueError, match="without a preconditioner"):
        cg(A, b, M=torch.ones(10, dtype=torch.float64), radius=1.0)
