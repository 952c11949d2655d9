"""No silent wrong answer (issue 14): convexity of a non-symmetric matrix or with invalid
tolerances, products of an inverse operator whose CG solve failed, and a finite-difference
product with a malformed gradient are refused; the valid cases agree with float64
references from numpy.linalg / torch.linalg."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hesse
from hesse.linalg import InverseOperator, NotConvergedError, cg, minres

f64 = torch.float64


# -- convexity: the dense path needs a symmetric matrix ----------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e12])
def test_convexity_refuses_a_non_symmetric_matrix_at_any_scale(scale):
    A = torch.tensor([[1.0, 4.0], [0.0, 1.0]]) * scale
    # the reference: the quadratic form is that of (A + A^T) / 2, eigenvalues -1 and 3
    lam = np.linalg.eigvalsh(((A + A.T) / 2).double().numpy() / scale)
    assert lam[0] < 0 < lam[1]
    for target in (A, hesse.DenseOperator(A)):
        with pytest.raises(ValueError, match=r"expected a symmetric matrix.*\(A \+ A\.T\) / 2"):
            hesse.convexity(target)


def test_convexity_of_the_symmetric_part_matches_numpy():
    A = torch.tensor([[1.0, 4.0], [0.0, 1.0]], dtype=f64)
    rep = hesse.convexity((A + A.T) / 2)
    lam = np.linalg.eigvalsh(((A + A.T) / 2).numpy())
    assert rep.verdict == "indefinite" and rep.certified
    assert rep.min_eigenvalue == pytest.approx(lam[0], abs=1e-12)
    assert rep.max_eigenvalue == pytest.approx(lam[-1], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_convexity_accepts_rounding_level_asymmetry_and_reads_both_triangles(dtype):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=f64)
    S = B @ B.T - 0.5 * torch.eye(6, dtype=f64)
    eps = torch.finfo(dtype).eps
    A = (S + eps * S.abs().max() * torch.randn(6, 6, generator=g, dtype=f64)).to(dtype)
    rep = hesse.convexity(A)
    lam = torch.linalg.eigvalsh(((A + A.T) / 2).double())
    assert rep.min_eigenvalue == pytest.approx(float(lam[0]), abs=10 * eps * float(lam.abs().max()))
    assert rep.max_eigenvalue == pytest.approx(float(lam[-1]), rel=10 * eps)


def test_convexity_refuses_an_operator_tagged_non_symmetric():
    A = torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=f64)
    op = hesse.DenseOperator(A) + hesse.DenseOperator(torch.eye(2, dtype=f64))
    assert not op.symmetric
    with pytest.raises(ValueError, match="symmetric"):
        hesse.convexity(op)


BAD_TOLERANCES = [
    ("atol", math.nan),
    ("atol", -1e-3),
    ("atol", math.inf),
    ("atol", "0"),
    ("rtol", 2.0),
    ("rtol", 1.0),
    ("rtol", -0.1),
    ("rtol", math.nan),
    ("rtol", True),
    ("gtol", -1.0),
    ("gtol", math.nan),
    ("lanczos_tol", 0.0),
    ("lanczos_tol", 1.0),
    ("lanczos_tol", math.nan),
]


@pytest.mark.parametrize(("name", "value"), BAD_TOLERANCES)
def test_convexity_refuses_invalid_tolerances(name, value):
    minus_I = -torch.eye(3, dtype=f64)
    with pytest.raises(ValueError, match=rf"{name} must be a finite real number.*got {value!r}"):
        hesse.convexity(minus_I, **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be"):
        hesse.convexity(lambda z: (z**2).sum(), torch.zeros(2, dtype=f64), **{name: value})


def test_convexity_with_valid_extreme_tolerances_keeps_the_sign():
    minus_I = -torch.eye(3, dtype=f64)
    assert hesse.convexity(minus_I, rtol=0.99).verdict == "negative_definite"
    assert hesse.convexity(minus_I, atol=0.5).verdict == "negative_definite"
    assert hesse.convexity(minus_I, atol=2.0).verdict == "positive_semidefinite"  # |l| <= atol


# -- InverseOperator: a product cannot carry a status, so it raises ----------------------


def test_inverse_operator_raises_at_negative_curvature_and_minres_solves():
    D = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=f64))
    b = torch.ones(3, dtype=f64)
    assert cg(D, b).status == "negative_curvature"  # cg itself still returns a status
    Inv = InverseOperator(D)
    with pytest.raises(NotConvergedError, match=r"negative.*damping=lam.*minres"):
        Inv @ b
    assert Inv.last_results[0].status == "negative_curvature"
    ref = np.linalg.solve(D.numpy(), b.numpy())
    np.testing.assert_allclose(minres(D, b, rtol=1e-12).x.numpy(), ref, rtol=1e-10)
    damped = InverseOperator(D, damping=2.0, rtol=1e-12)
    ref = np.linalg.solve((D + 2.0 * torch.eye(3, dtype=f64)).numpy(), b.numpy())
    np.testing.assert_allclose((damped @ b).numpy(), ref, rtol=1e-10)


def test_inverse_operator_raises_on_a_singular_matrix_and_when_starved():
    D = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=f64))
    with pytest.raises(NotConvergedError, match="InverseOperator"):
        InverseOperator(D) @ torch.ones(3, dtype=f64)
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=f64))
    A = Q @ torch.diag(torch.logspace(-2, 2, 40, dtype=f64)) @ Q.T
    A = (A + A.T) / 2
    B = torch.randn(40, 2, generator=g, dtype=f64)
    with pytest.raises(NotConvergedError, match=r"did not converge.*raise max_iter"):
        InverseOperator(A, max_iter=3) @ B
    out = InverseOperator(A, rtol=1e-12, max_iter=400) @ B
    torch.testing.assert_close(out, torch.linalg.solve(A, B), rtol=1e-8, atol=1e-10)


# -- fd_hvp: the user's gradient is checked ----------------------------------------------


def _cube(z):
    return (z**3).sum()


@pytest.mark.parametrize(
    ("grad_fn", "error", "match"),
    [
        (lambda z: (3 * z**2).sum(), ValueError, r"shape \(3,\).*got shape \(\)"),
        (lambda z: 3 * z[None] ** 2, ValueError, r"got shape \(1, 3\)"),
        (lambda z: (3 * z**2).tolist(), TypeError, "got list"),
        (lambda z: (3 * z**2).float(), TypeError, "torch.float64.*got torch.float32"),
    ],
)
def test_fd_hvp_refuses_a_malformed_gradient(grad_fn, error, match):
    x = torch.tensor([1.0, 2.0, -0.5], dtype=f64)
    with pytest.raises(error, match=match):
        hesse.fd_hvp(_cube, x, torch.ones(3, dtype=f64), grad_fn=grad_fn)


def test_fd_hvp_with_a_correct_gradient_matches_the_dense_hessian():
    x = torch.tensor([1.0, 2.0, -0.5], dtype=f64)
    v = torch.tensor([0.5, -1.0, 2.0], dtype=f64)
    ref = torch.autograd.functional.hessian(_cube, x) @ v
    out = hesse.fd_hvp(_cube, x, v, grad_fn=lambda z: 3 * z**2)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
