"""Wrong arguments to the public API give one clear ValueError/TypeError naming the argument
(issue 14), never a raw error from torch, numpy or Python internals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hesse
import hesse.linalg as hl

f64 = torch.float64
A = torch.diag(torch.arange(1.0, 7.0, dtype=f64))

SEEDED = {
    "eigenvalues": lambda seed: hesse.eigenvalues(A, seed=seed),
    "trace": lambda seed: hesse.trace(A, num_matvecs=6, seed=seed),
    "diagonal": lambda seed: hesse.diagonal(A, num_matvecs=6, seed=seed),
    "diagonal_exact": lambda seed: hesse.diagonal(A, method="exact", seed=seed),
    "spectral_density": lambda seed: hesse.spectral_density(A, num_probes=2, seed=seed),
    "condition_number": lambda seed: hesse.condition_number(A, seed=seed),
    "convexity": lambda seed: hesse.convexity(A, seed=seed),
    "convexity_box": lambda seed: hesse.convexity(
        lambda z: (z**2).sum(), torch.zeros(2, dtype=f64), box=(-1.0, 1.0), num_points=2, seed=seed
    ),
    "low_rank": lambda seed: hesse.low_rank(A, 2, seed=seed),
    "lanczos": lambda seed: hl.lanczos(A, seed=seed),
    "power_iteration": lambda seed: hl.power_iteration(A, seed=seed),
    "hutchinson_trace": lambda seed: hl.hutchinson_trace(A, 6, seed=seed),
    "hutchpp_trace": lambda seed: hl.hutchpp_trace(A, 6, seed=seed),
    "xtrace": lambda seed: hl.xtrace(A, 6, seed=seed),
    "xdiag": lambda seed: hl.xdiag(A, 6, seed=seed),
    "hutchinson_diagonal": lambda seed: hl.hutchinson_diagonal(A, 6, seed=seed),
    "linalg.spectral_density": lambda seed: hl.spectral_density(A, num_probes=2, seed=seed),
}


def _layer_report(seed):
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    data = (torch.randn(4, 2, dtype=f64), torch.randn(4, 1, dtype=f64))
    return hesse.layer_report(model, nn.MSELoss(), data, seed=seed)


SEEDED["layer_report"] = _layer_report

BAD_SEEDS = [
    ("abc", TypeError, r"seed must be an integer.*'abc'"),
    ([1, 2], TypeError, r"seed must be an integer.*list"),
    (1.7, TypeError, r"seed must be an integer.*1\.7"),
    (True, TypeError, r"seed must be an integer.*bool"),
    (2**70, ValueError, r"seed must be an integer in \[0, 2\*\*63\), got 1180591620717411303424"),
    (-1, ValueError, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
]


@pytest.mark.parametrize("name", list(SEEDED))
@pytest.mark.parametrize(("seed", "exc", "match"), BAD_SEEDS, ids=lambda v: repr(v)[:12])
def test_bad_seed_is_named(name, seed, exc, match):
    with pytest.raises(exc, match=match):
        SEEDED[name](seed)


@pytest.mark.parametrize("seed", [None, 0, 2**63 - 1, np.int64(3)], ids=repr)
def test_good_seeds_work(seed):
    r = hesse.eigenvalues(A, seed=seed, tol=1e-10)
    assert float(r.eigenvalues[0]) == pytest.approx(6.0)
    if seed is not None:
        assert hesse.trace(A, num_matvecs=4, seed=seed).estimate == (
            hesse.trace(A, num_matvecs=4, seed=int(seed)).estimate
        )


def test_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        hesse.trace(A, num_matvecs=6, generator=0)


# -- zero columns and empty matrices -------------------------------------------------------
def test_product_with_zero_columns_is_empty():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = (torch.randn(5, 3, dtype=f64), torch.randn(5, 1, dtype=f64))
    H = hesse.HessianOperator(model, nn.MSELoss(), data)
    P = H.shape[0]
    out = H @ torch.ones(P, 0, dtype=f64)
    assert out.shape == (P, 0) and out.dtype == f64


def test_dense_product_with_zero_columns_is_empty():
    from hesse.operators import DenseOperator

    out = DenseOperator(A) @ torch.ones(6, 0, dtype=f64)
    assert out.shape == (6, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda E: hesse.eigenvalues(E),
        lambda E: hesse.trace(E),
        lambda E: hesse.condition_number(E),
        lambda E: hesse.convexity(E),
        lambda E: hl.lanczos(E),
        lambda E: hl.cg(E, torch.zeros(0)),
        lambda E: hl.xtrace(E, 4),
    ],
)
def test_empty_matrix_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"the matrix is empty \(0 x 0\)"):
        call(torch.zeros(0, 0))


# -- tolerances and start vectors -----------------------------------------------------------
@pytest.mark.parametrize("tol", [None, "1e-3", float("nan"), 0.0, -1.0], ids=repr)
@pytest.mark.parametrize(
    "call",
    [
        lambda tol: hesse.eigenvalues(A, tol=tol, seed=0),
        lambda tol: hesse.condition_number(A, tol=tol, seed=0),
        lambda tol: hesse.low_rank(A, 2, tol=tol, seed=0),
        lambda tol: hl.lanczos(A, tol=tol, seed=0),
        lambda tol: hl.power_iteration(A, tol=tol, seed=0),
    ],
)
def test_bad_tol_is_named(call, tol):
    with pytest.raises(ValueError, match=r"tol must be a finite real number > 0, got"):
        call(tol)


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [None, "1e-3", -1.0], ids=repr)
def test_bad_solver_tolerance_is_named(name, value):
    b = torch.ones(6, dtype=f64)
    for solve in (hl.cg, hl.minres):
        with pytest.raises(ValueError, match=rf"{name} must be a finite real number"):
            solve(A, b, **{name: value})


def test_bad_layer_report_tol_is_named():
    model = nn.Linear(2, 1).double()
    data = (torch.randn(4, 2, dtype=f64), torch.randn(4, 1, dtype=f64))
    with pytest.raises(ValueError, match="tol must be a finite real number"):
        hesse.layer_report(model, nn.MSELoss(), data, tol="1e-3")


@pytest.mark.parametrize(
    ("v0", "exc", "match"),
    [
        ([1, 2], TypeError, r"v0 must be a torch.Tensor of shape \(6,\), got list"),
        (torch.ones(5, dtype=f64), ValueError, r"v0 must have shape \(6,\), got \(5,\)"),
        (torch.ones(6, 1, dtype=f64), ValueError, r"v0 must have shape \(6,\), got \(6, 1\)"),
    ],
)
def test_bad_start_vector_is_named(v0, exc, match):
    with pytest.raises(exc, match=match):
        hl.lanczos(A, v0=v0)
    with pytest.raises(exc, match=match):
        hl.power_iteration(A, v0=v0)
    with pytest.raises(exc, match=match.replace("v0", "x0")):
        hl.cg(A, torch.ones(6, dtype=f64), x0=v0)


# -- convexity over a segment ---------------------------------------------------------------
def _f(z):
    return (z**2).sum()


@pytest.mark.parametrize(
    ("segment", "exc", "match"),
    [
        ((torch.zeros(2), torch.ones(3)), ValueError, r"same shape, got \(2,\) and \(3,\)"),
        ((torch.zeros(2), [1.0, 1.0]), TypeError, "segment end x1 must be a floating point"),
        ((torch.zeros(2, dtype=torch.long), torch.ones(2)), TypeError, "segment end x0"),
        ((torch.zeros(2),), ValueError, r"segment must be a pair \(x0, x1\)"),
        ((torch.zeros(2), torch.ones(2, dtype=f64)), ValueError, "same dtype and device"),
    ],
)
def test_bad_segment_is_named(segment, exc, match):
    with pytest.raises(exc, match=match):
        hesse.convexity(_f, segment=segment)


def test_good_segment_works():
    rep = hesse.convexity(_f, segment=(torch.zeros(2, dtype=f64), torch.ones(2, dtype=f64)))
    assert rep.min_eigenvalue == pytest.approx(2.0)
