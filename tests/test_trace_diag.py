"""Trace and diagonal estimators against exact float64 references.

Stochastic estimators are tested by seeded convergence over several seeds (mean errors,
their decay with the budget, calibrated standard errors), never by one lucky draw.
"""

import math

import pytest
import torch
from torch import nn

from conftest import make_data, mlp
from hesse import CurvatureOperator, DenseOperator, HessianOperator
from hesse.linalg._common import NotConvergedError, Status
from hesse.linalg._diag import (
    DiagonalResult,
    exact_diagonal,
    hutchinson_diagonal,
    xdiag,
    xdiag_estimates,
)
from hesse.linalg._trace import (
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
    xtrace_estimates,
)

F64 = {"dtype": torch.float64}
N = 120
TRACE = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace}
DIAGONAL = {"hutchinson": hutchinson_diagonal, "xdiag": xdiag}


def with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(lam) Uᵀ`` with a random orthogonal ``U`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, **F64)).Q
    return (U * lam) @ U.T


SPECTRA = {
    # 8 large eigenvalues decaying from 100 to 1, then a flat tail at 0.01
    "low_rank_noise": torch.cat(
        [torch.logspace(2, 0, 8, **F64), torch.full((N - 8,), 0.01, **F64)]
    ),
    "flat": torch.linspace(1, 2, N, **F64),
    "indefinite": torch.cat(
        [torch.tensor([50.0, -40, 30, -20, 10], **F64), torch.linspace(-1, 1, N - 5, **F64) + 0.3]
    ),
}
MATRICES = {name: with_spectrum(lam) for name, lam in SPECTRA.items()}


def trace_errors(fn, A, budget, seeds=range(10), **kw):
    """Signed errors and standard errors of ``fn`` over seeds."""
    results = [fn(A, budget, seed=s, **kw) for s in seeds]
    assert all(r.status == Status.BUDGET for r in results)
    err = torch.tensor([r.estimate for r in results], **F64) - float(A.trace())
    return err, torch.tensor([r.stderr for r in results], **F64)


class Counting(CurvatureOperator):
    """A dense matrix that counts the columns it is applied to and can fail after a while."""

    def __init__(self, A, fail_after=None, symmetric=True):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.columns, self.fail_after = A, 0, fail_after
        self.symmetric, self.chunk_size = symmetric, 16

    def _matmat(self, V):
        self.columns += V.shape[1]
        out = self.A @ V
        if self.fail_after is not None and self.columns > self.fail_after:
            out = out * math.nan
        return out


# -- trace: accuracy ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MATRICES))
def test_hutchinson_error_matches_its_variance(name):
    # Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for Rademacher z: the rms error over 20 seeds is close
    # to the predicted standard deviation, and falls as 1/sqrt(m).
    A = MATRICES[name]
    off = float((A**2).sum() - (A.diagonal() ** 2).sum())
    for m in (16, 256):
        err, se = trace_errors(hutchinson_trace, A, m, seeds=range(20))
        predicted = math.sqrt(2 * off / m)
        assert 0.5 * predicted < err.pow(2).mean().sqrt() < 1.5 * predicted
        assert 0.5 * predicted < se.mean() < 1.5 * predicted


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize("name", ["low_rank_noise", "indefinite"])
def test_error_shrinks_with_budget(method, name):
    A = MATRICES[name]
    small, _ = trace_errors(TRACE[method], A, 24)
    large, _ = trace_errors(TRACE[method], A, 96)
    assert large.abs().mean() < small.abs().mean() / 1.5


def test_hutchpp_and_xtrace_beat_hutchinson_on_low_rank_plus_noise():
    A = MATRICES["low_rank_noise"]
    mean_err = {m: trace_errors(fn, A, 30)[0].abs().mean() for m, fn in TRACE.items()}
    # measured (relative to the trace): Hutchinson 1e-1, Hutch++ 5e-5, XTrace 5e-6
    assert mean_err["hutch++"] < mean_err["hutchinson"] / 100
    assert mean_err["xtrace"] < mean_err["hutch++"] / 4
    assert mean_err["xtrace"] < 1e-4 * float(A.trace())


@pytest.mark.parametrize("probes", ["improved", "sphere", "signs"])
def test_xtrace_probe_kinds_converge(probes):
    A = MATRICES["indefinite"]
    err, se = trace_errors(xtrace, A, 60, probes=probes)
    assert err.abs().mean() < 0.05 * float(A.trace())
    assert (err.abs() <= 3 * se).sum() >= 8


@pytest.mark.parametrize("method", list(TRACE))
@pytest.mark.parametrize("name", list(MATRICES))
def test_stderr_is_calibrated(method, name):
    # the true error is within 3 standard errors on most seeds, and the standard error is
    # not a gross overestimate either
    err, se = trace_errors(TRACE[method], MATRICES[name], 48)
    assert (err.abs() <= 3 * se).sum() >= 8
    assert se.mean() < 3 * err.pow(2).mean().sqrt()


def test_low_rank_and_small_operators_give_the_exact_trace():
    U = torch.linalg.qr(torch.randn(60, 4, generator=torch.Generator().manual_seed(0), **F64)).Q
    low_rank = (U * torch.tensor([5.0, -3.0, 2.0, 1.0], **F64)) @ U.T
    r = xtrace(low_rank, 12, seed=0)  # 6 probes > rank 4
    assert r.estimate == pytest.approx(float(low_rank.trace()), abs=1e-12) and r.stderr < 1e-12
    small = MATRICES["indefinite"][:10, :10]
    for fn, budget in ((hutchpp_trace, 30), (xtrace, 20)):  # the sketch spans everything
        r = fn(small, budget, seed=0)
        assert r.estimate == pytest.approx(float(small.trace()), rel=1e-12) and r.stderr == 0
    zero = torch.zeros(8, 8)
    for fn in TRACE.values():
        assert fn(zero, 8, seed=0).estimate == 0.0


def leave_one_out_bases(Y):
    """Orthonormal bases of the range of ``Y`` without column ``i``, one per column."""
    m = Y.shape[1]
    return [torch.linalg.qr(Y[:, [j for j in range(m) if j != i]]).Q for i in range(m)]


@pytest.mark.parametrize("improved", [False, True])
def test_xtrace_formulas_match_explicit_leave_one_out(improved):
    # the downdating formulas of the reference code against Q_(i) = orth(A Ω_{-i}) formed
    # one by one; A is not symmetric, which XTrace allows
    n, m = 40, 7
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=g, **F64)
    Om = torch.randn(n, m, generator=g, **F64)
    Om = Om * (math.sqrt(n) / Om.norm(dim=0))
    Y = A @ Om
    Q, R = torch.linalg.qr(Y)
    fast = xtrace_estimates(Om, Q, R, A @ Q, Q.T @ A @ Q, improved)
    explicit = []
    for i, Qi in enumerate(leave_one_out_bases(Y)):
        P = torch.eye(n, **F64) - Qi @ Qi.T
        w = Om[:, i] * (math.sqrt((n - m + 1) / (P @ Om[:, i]).pow(2).sum()) if improved else 1)
        explicit.append(torch.trace(Qi.T @ A @ Qi) + w @ P @ A @ P @ w)
    torch.testing.assert_close(fast, torch.stack(explicit), rtol=1e-10, atol=1e-10)


def test_mlp_hessian_trace():
    model, (X, y) = mlp(), make_data("ce")
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    dense = H.to_dense()
    P, exact = dense.shape[0], float(dense.trace())
    scale = float(dense.norm())  # the trace is small next to the entries (indefinite)
    for method, fn in TRACE.items():
        results = [fn(H, 60, seed=s) for s in range(3)]
        for r in results:
            assert r.status == Status.BUDGET and r.matvecs == 60 and r.method == method
            assert abs(r.estimate - exact) <= 4 * r.stderr + 1e-12 * scale
    r = xtrace(H, 2 * P, seed=0)  # m = P probes: exact
    assert r.estimate == pytest.approx(exact, rel=1e-9, abs=1e-12 * scale)
    # the densified Hessian and the operator give the same estimate for the same seed
    assert xtrace(dense, 60, seed=1).estimate == pytest.approx(xtrace(H, 60, seed=1).estimate)


# -- trace: contract ---------------------------------------------------------------------
@pytest.mark.parametrize("method", list(TRACE))
def test_reproducible_with_seed_or_generator(method):
    A, fn = MATRICES["flat"], TRACE[method]
    assert fn(A, 30, seed=5) == fn(A, 30, seed=5)
    assert fn(A, 30, seed=5).estimate != fn(A, 30, seed=6).estimate
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert fn(A, 30, generator=g1) == fn(A, 30, generator=g2)
    # on CPU the probes, hence the estimate, do not depend on how many go in one product
    a, b = fn(A, 30, seed=5, batch_size=4), fn(A, 30, seed=5)
    assert a.estimate == pytest.approx(b.estimate, rel=1e-12)


@pytest.mark.parametrize("method", list(TRACE))
@pytest.mark.parametrize("budget", [6, 7, 8, 31, 100, 400])
def test_matvecs_are_counted_exactly(method, budget):
    op = Counting(MATRICES["indefinite"][:50, :50])
    r = TRACE[method](op, budget, seed=0)
    assert r.matvecs == op.columns <= budget
    assert r.status == Status.BUDGET and math.isfinite(r.estimate)


@pytest.mark.parametrize("method", list(TRACE))
def test_float32_operator_stays_float32(method):
    A = MATRICES["low_rank_noise"].float()
    r = TRACE[method](DenseOperator(A), 60, seed=0)  # a float64 probe would be refused
    assert isinstance(r.estimate, float) and isinstance(r.stderr, float)
    assert abs(r.estimate - float(A.double().trace())) < 0.2 * float(A.double().trace())


@pytest.mark.parametrize("method", list(TRACE))
@pytest.mark.parametrize("fail_after", [0, 20])
def test_non_finite_products_are_reported(method, fail_after):
    op = Counting(MATRICES["flat"][:40, :40], fail_after=fail_after)
    r = TRACE[method](op, 60, seed=0)
    assert r.status == Status.NON_FINITE and not r.success
    assert math.isnan(r.estimate) and 0 < r.matvecs <= 60
    with pytest.raises(NotConvergedError, match="not finite"):
        r.raise_for_status()
    assert isinstance(r, TraceResult)


@pytest.mark.parametrize("method,minimum", [("hutchinson", 2), ("hutch++", 6), ("xtrace", 4)])
def test_trace_argument_errors(method, minimum):
    fn, A = TRACE[method], MATRICES["flat"]
    for bad in (minimum - 1, 0, -5, 2.5, True, "10"):
        with pytest.raises(ValueError, match=f"num_matvecs >= {minimum}"):
            fn(A, bad)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0, 0), 10)
    with pytest.raises(ValueError, match="square"):
        fn(torch.zeros(3, 4), 10)
    with pytest.raises(TypeError, match="hesse operator"):
        fn([[1.0, 0.0], [0.0, 1.0]], 10)
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.eye(3, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="seed or generator"):
        fn(A, 10, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        fn(A, 10, batch_size=0)


def test_xtrace_probes_must_be_known():
    with pytest.raises(ValueError, match="probes"):
        xtrace(MATRICES["flat"], 10, probes="gaussian")


# -- diagonal ----------------------------------------------------------------------------
def test_exact_diagonal_matches_torch_diagonal():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(37, 37, generator=g, **F64)  # not symmetric
    op = DenseOperator(A)
    op.chunk_size = 8  # several column chunks
    r = exact_diagonal(op)
    assert r.status == Status.CONVERGED and r.matvecs == 37 and r.method == "exact"
    torch.testing.assert_close(r.estimate, torch.diagonal(A), rtol=0, atol=0)
    assert torch.equal(r.stderr, torch.zeros(37, **F64))
    model, (X, y) = mlp(), make_data("ce")
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(exact_diagonal(H).estimate, torch.diagonal(H.to_dense()))


def diagonal_errors(fn, A, budget, seeds=range(5)):
    """Relative errors ‖d̂ - d‖/‖d‖ and the share of entries within 3 standard errors."""
    d = A.diagonal()
    rel, covered = [], []
    for s in seeds:
        r = fn(A, budget, seed=s)
        assert r.status == Status.BUDGET and r.matvecs == budget
        rel.append(float((r.estimate - d).norm() / d.norm()))
        covered.append(float(((r.estimate - d).abs() <= 3 * r.stderr).double().mean()))
    return sum(rel) / len(rel), min(covered)


@pytest.mark.parametrize("method", list(DIAGONAL))
@pytest.mark.parametrize("name", ["low_rank_noise", "indefinite"])
def test_diagonal_estimators_converge(method, name):
    A = MATRICES[name]
    small, cov_small = diagonal_errors(DIAGONAL[method], A, 24)
    large, cov_large = diagonal_errors(DIAGONAL[method], A, 96)
    assert large < small / 1.5
    assert min(cov_small, cov_large) > 0.8  # per-entry standard errors are sensible


def test_xdiag_beats_hutchinson_on_low_rank_plus_noise():
    A = MATRICES["low_rank_noise"]
    hutch, _ = diagonal_errors(hutchinson_diagonal, A, 48)
    x, _ = diagonal_errors(xdiag, A, 48)
    assert x < hutch / 50  # measured: ~1e-3 against ~0.6


def test_hutchinson_diagonal_error_matches_its_variance():
    # entry k has variance Σ_{j≠k} A_kj² / m
    A = MATRICES["flat"]
    predicted = ((A**2).sum(1) - A.diagonal() ** 2) / 64
    errs = torch.stack(
        [hutchinson_diagonal(A, 64, seed=s).estimate - A.diagonal() for s in range(20)]
    )
    ratio = errs.pow(2).mean(0).sum() / predicted.sum()
    assert 0.7 < float(ratio) < 1.3


def test_xdiag_formulas_match_explicit_leave_one_out():
    n, m = 30, 6
    g = torch.Generator().manual_seed(4)
    B = torch.randn(n, n, generator=g, **F64)
    A = B + B.T
    Om = (2 * torch.randint(0, 2, (n, m), generator=g) - 1).double()
    Y = A @ Om
    Q, R = torch.linalg.qr(Y)
    Z = A @ Q
    fast = xdiag_estimates(Om, Y, Q, R, Z, (Q * Z).sum(1))
    explicit = []
    for i, Qi in enumerate(leave_one_out_bases(Y)):
        P = torch.eye(n, **F64) - Qi @ Qi.T
        explicit.append(torch.diagonal(Qi @ Qi.T @ A) + Om[:, i] * (P @ A @ Om[:, i]))
    torch.testing.assert_close(fast, torch.stack(explicit, dim=1), rtol=1e-10, atol=1e-10)


def test_xdiag_is_exact_on_low_rank_and_small_operators():
    U = torch.linalg.qr(torch.randn(50, 3, generator=torch.Generator().manual_seed(1), **F64)).Q
    A = (U * torch.tensor([4.0, -2.0, 1.0], **F64)) @ U.T
    torch.testing.assert_close(xdiag(A, 10, seed=0).estimate, A.diagonal())
    small = MATRICES["indefinite"][:8, :8]
    torch.testing.assert_close(xdiag(small, 16, seed=0).estimate, small.diagonal())


@pytest.mark.parametrize("method", list(DIAGONAL))
def test_diagonal_contract(method):
    fn, A = DIAGONAL[method], MATRICES["flat"]
    r32 = fn(A.float(), 20, seed=3)
    assert isinstance(r32, DiagonalResult)
    assert r32.estimate.dtype == torch.float32 and r32.stderr.dtype == torch.float32
    assert r32.estimate.shape == (N,) and r32.stderr.shape == (N,)
    assert torch.equal(fn(A, 20, seed=3).estimate, fn(A, 20, seed=3).estimate)
    assert not torch.equal(fn(A, 20, seed=3).estimate, fn(A, 20, seed=4).estimate)
    batched = fn(A, 20, seed=3, batch_size=3).estimate
    torch.testing.assert_close(batched, fn(A, 20, seed=3).estimate, rtol=1e-12, atol=1e-12)
    op = Counting(A[:40, :40], fail_after=10)
    bad = fn(op, 30, seed=0)
    assert bad.status == Status.NON_FINITE and bool(bad.estimate.isnan().all())
    with pytest.raises(NotConvergedError):
        bad.raise_for_status()
    assert exact_diagonal(Counting(A[:20, :20], fail_after=0)).status == Status.NON_FINITE


def test_diagonal_argument_errors():
    A = MATRICES["flat"]
    with pytest.raises(ValueError, match="num_matvecs >= 2"):
        hutchinson_diagonal(A, 1)
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        xdiag(A, 3)
    with pytest.raises(ValueError, match="symmetric"):
        xdiag(torch.triu(A), 10)
    with pytest.raises(ValueError, match="empty"):
        hutchinson_diagonal(torch.zeros(0, 0), 10)
    with pytest.raises(ValueError, match="seed or generator"):
        xdiag(A, 10, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="hesse operator"):
        exact_diagonal("A")
    assert exact_diagonal(torch.zeros(0, 0)).estimate.shape == (0,)


def test_density_negative_shares_match_the_eigenvalues():
    """The shares a density reports against numpy's eigenvalues of the same matrix."""
    import numpy as np

    from hesse.linalg import spectral_density

    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.linspace(-1.0, -0.2, 40), torch.linspace(0.5, 4.0, 160)]).double()
    A = Q @ torch.diag(lam) @ Q.T
    r = spectral_density(A, num_probes=30, steps=60, seed=0)
    ev = np.linalg.eigh(A.numpy())[0]
    exact_curv = np.abs(ev[ev < 0]).sum() / np.abs(ev).sum()
    exact_count = (ev < -r.sigma).mean()
    assert abs(r.negative_curvature_share() - exact_curv) < 0.02
    assert abs(r.negative_eigenvalue_share() - exact_count) < 0.05


# -- the shared probe step ----------------------------------------------------------------
def test_probe_diagonal_is_z_times_az():
    from hesse.linalg._diag import probe_diagonal

    A = MATRICES["indefinite"][:6, :6]
    z = torch.tensor([1.0, -1, -1, 1, 1, -1], **F64)
    (d,) = probe_diagonal(lambda v: [A @ v[0]], [z])
    torch.testing.assert_close(d, z * (A @ z), rtol=0, atol=0)
    # blocks: the products of the blocks of one vector
    blocks = probe_diagonal(lambda v: list((A @ torch.cat(v)).split([2, 4])), [z[:2], z[2:]])
    assert torch.equal(torch.cat(blocks), d)
    with pytest.raises(ValueError, match=r"one tensor per tensor of the probe \(2\), got 1"):
        probe_diagonal(lambda v: [A @ torch.cat(v)], [z[:2], z[2:]])


def test_hutchinson_diagonal_is_the_mean_of_probe_steps_with_its_signs():
    # Pins the estimator to its parts: probe k is row k of one (m, P) Rademacher draw from
    # the seed, whatever the batch size, and the estimate is the mean of z ⊙ Az over them.
    from hesse._core._random import rademacher

    A = MATRICES["indefinite"]
    n, m = A.shape[0], 24
    Z = rademacher((m, n), dtype=A.dtype, device="cpu", generator=torch.Generator().manual_seed(9))
    V = Z * (A @ Z.T).T
    for batch in (5, 24):
        r = hutchinson_diagonal(A, m, seed=9, batch_size=batch)
        torch.testing.assert_close(r.estimate, V.mean(0), rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(r.stderr, V.std(0) / math.sqrt(m), rtol=1e-10, atol=1e-12)
