"""Is the Hessian positive (semi)definite here, where is it not, is this a saddle?"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from hesse._core._checks import check_real, check_seed
from hesse.linalg import ConvergenceWarning, lanczos
from hesse.linalg._common import (
    HALF_DTYPES,
    PRODUCT_EPS,
    as_operator,
    check_positive_int,
    error_floor,
    make_generator,
    promote,
)
from hesse.operators import CurvatureOperator, DenseOperator, FunctionHessian
from hesse.operators._function import gradient


class Verdict(str, Enum):
    """The definiteness of a symmetric matrix, within a tolerance."""

    POSITIVE_DEFINITE = "positive_definite"
    POSITIVE_SEMIDEFINITE = "positive_semidefinite"
    INDEFINITE = "indefinite"
    NEGATIVE_SEMIDEFINITE = "negative_semidefinite"
    NEGATIVE_DEFINITE = "negative_definite"

    def __str__(self) -> str:
        return self.value


def verdict(lam_min: float, lam_max: float, threshold: float) -> Verdict:
    """Definiteness from the extreme eigenvalues; ``|lambda| <= threshold`` counts as 0."""
    if lam_min > threshold:
        return Verdict.POSITIVE_DEFINITE
    if lam_min >= -threshold:
        return Verdict.POSITIVE_SEMIDEFINITE
    if lam_max < -threshold:
        return Verdict.NEGATIVE_DEFINITE
    if lam_max <= threshold:
        return Verdict.NEGATIVE_SEMIDEFINITE
    return Verdict.INDEFINITE


@dataclass(frozen=True)
class ConvexityReport:
    """The answer of :func:`convexity`, with its evidence.

    Attributes:
        verdict: a :class:`Verdict` (compare with strings: ``r.verdict == "indefinite"``).
        min_eigenvalue, max_eigenvalue: the extreme eigenvalues found (over a set of points:
            the smallest and the largest over all points).
        tol: the threshold below which an eigenvalue's magnitude counts as zero
            (``max(atol, rtol * max|lambda|)``).
        direction: a unit direction of the most negative curvature, when it is negative
            beyond ``tol`` (at the worst point, over a set).
        gradient_norm: the gradient's norm (functions only).
        is_saddle: indefinite where the gradient is (near) zero: a saddle point.
        exact: eigenvalues from a dense ``eigh`` (small problems) rather than Lanczos.
        matvecs: Hessian-vector products used (0 when dense).
        residuals: Lanczos residuals of the two extreme eigenvalues (certificates).
        certified: the verdict is backed by the evidence: exact eigenvalues, or a Ritz value
            of the right sign (which proves curvature of that sign), or a converged
            bottom (top) end for a (negative) semidefinite verdict; and it holds for every
            eigenvalue within ``error_floor`` (and, at a converged end, the residual) of
            those found, so a sign closer to zero than the products' error is not
            certified. When not, a :class:`~hesse.linalg.ConvergenceWarning` is raised too.
        points: the number of points examined.
        share_nonconvex: over a set, the share of points with negative curvature.
        worst_point: over a set, the point of most negative curvature.
        reports: over a set, the report of each point.
        error_floor: the error of the eigenvalues that the products' precision leaves,
            ``max(product_rtol, 4 eps(dtype)) * max|lambda|`` (over a set, the largest).
        dtype: the dtype the products (or the dense matrix) were computed in; the
            eigenvalue problem runs in float32 for float16 and bfloat16.
    """

    verdict: Verdict
    min_eigenvalue: float
    max_eigenvalue: float
    tol: float
    direction: Tensor | None = None
    gradient_norm: float | None = None
    is_saddle: bool = False
    exact: bool = True
    matvecs: int = 0
    residuals: tuple[float, float] = (0.0, 0.0)
    certified: bool = True
    points: int = 1
    share_nonconvex: float | None = None
    worst_point: Tensor | None = None
    reports: list[ConvexityReport] = field(default_factory=list, repr=False)
    error_floor: float = 0.0
    dtype: torch.dtype | None = None

    @property
    def is_convex(self) -> bool:
        """Positive semidefinite (within tolerance) everywhere examined."""
        return self.verdict in (Verdict.POSITIVE_DEFINITE, Verdict.POSITIVE_SEMIDEFINITE)


class _Ends(NamedTuple):
    """The evidence for a verdict: the extreme eigenvalues and how sure they are."""

    lo: float
    hi: float
    vec: Tensor  # the eigenvector of lo
    exact: bool
    matvecs: int
    residuals: tuple[float, float]
    converged: tuple[bool, bool]
    error_floor: float
    dtype: torch.dtype


def _extremes(
    op: CurvatureOperator,
    dense_limit: int,
    tol: float,
    seed: int | None,
    max_iter: int | None,
    dense: Tensor | None = None,
) -> _Ends:
    """Both ends of the spectrum: by ``eigh`` of ``dense`` (``op`` formed densely when not
    given) up to ``dense_limit`` unknowns, by Lanczos beyond."""
    n = op.shape[0]
    if n <= dense_limit:
        D = promote(op).to_dense() if dense is None else dense
        lam, vecs = torch.linalg.eigh(D)
        lo, hi = float(lam[0]), float(lam[-1])
        floor = error_floor(op, max(abs(lo), abs(hi)))
        return _Ends(lo, hi, vecs[:, 0], True, 0, (0.0, 0.0), (True, True), floor, op.dtype)
    r = lanczos(op, k=1, which="both", tol=tol, seed=seed, max_iter=max_iter or min(n, 200))
    return _Ends(
        float(r.eigenvalues[0]),
        float(r.eigenvalues[-1]),
        r.eigenvectors[:, 0],
        False,
        r.matvecs,
        (float(r.residuals[0]), float(r.residuals[-1])),
        (bool(r.converged[0]), bool(r.converged[-1])),
        r.error_floor,
        r.dtype,
    )


#: A verdict also holds when the truth is the stronger one next to it.
_IMPLIES = {
    Verdict.POSITIVE_SEMIDEFINITE: (Verdict.POSITIVE_DEFINITE,),
    Verdict.NEGATIVE_SEMIDEFINITE: (Verdict.NEGATIVE_DEFINITE,),
}


def _certified(v: Verdict, ends: _Ends, threshold: float) -> bool:
    r"""Whether the verdict ``v`` holds for every pair of extreme eigenvalues the evidence
    allows. A Ritz value lies inside the spectrum of the computed operator, which is
    within ``error_floor`` of the true one: :math:`\lambda_{\min} \le lo + e` and
    :math:`\lambda_{\max} \ge hi - e`. A converged end bounds the other side too,
    :math:`\lambda_{\min} \ge lo - r - e`; an unconverged one does not. The verdict is a
    monotone function of the two, so the corners of that box decide."""
    e, (r_lo, r_hi), (c_lo, c_hi) = ends.error_floor, ends.residuals, ends.converged
    los = (ends.lo - r_lo - e if c_lo else -math.inf, ends.lo + e)
    his = (ends.hi - e, ends.hi + r_hi + e if c_hi else math.inf)
    ok = (v, *_IMPLIES.get(v, ()))
    return all(verdict(a, b, threshold) in ok for a in los for b in his)


def _report_operator(
    op,
    *,
    rtol,
    atol,
    dense_limit,
    lanczos_tol,
    seed,
    max_iter,
    grad_norm=None,
    gtol=None,
    warn=True,
    dense=None,
) -> ConvexityReport:
    ends = _extremes(op, dense_limit, lanczos_tol, seed, max_iter, dense)
    lo, hi = ends.lo, ends.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the Hessian has non-finite entries at this point")
    threshold = max(atol, rtol * max(abs(lo), abs(hi)))
    v = verdict(lo, hi, threshold)
    certified = _certified(v, ends, threshold)
    if not certified and warn:
        warnings.warn(_uncertified(v, ends), ConvergenceWarning, stacklevel=3)
    direction = ends.vec / torch.linalg.vector_norm(ends.vec) if lo < -threshold else None
    saddle = v == Verdict.INDEFINITE and grad_norm is not None and grad_norm <= gtol
    return ConvexityReport(
        v,
        lo,
        hi,
        threshold,
        direction,
        grad_norm,
        saddle,
        ends.exact,
        ends.matvecs,
        ends.residuals,
        certified=certified,
        error_floor=ends.error_floor,
        dtype=ends.dtype,
    )


def _uncertified(v: Verdict, ends: _Ends) -> str:
    """Why the verdict ``v`` is not certified, and what to change."""
    if all(ends.converged):
        return (
            f"convexity: the verdict {v} is not certified: an eigenvalue it rests on is "
            f"within the products' error ({ends.error_floor:.2g}, {ends.dtype} products) "
            "of the threshold; compute the products in a wider dtype"
        )
    return (
        f"convexity: the verdict {v} is not certified: Lanczos did not converge at the "
        f"end it rests on in {ends.matvecs} products; raise max_iter or dense_limit"
    )


def convexity(
    target: object,
    x: Tensor | None = None,
    *,
    points: Tensor | None = None,
    box: tuple[Tensor | float, Tensor | float] | None = None,
    segment: tuple[Tensor, Tensor] | None = None,
    num_points: int = 20,
    rtol: float = 1e-6,
    atol: float = 0.0,
    gtol: float = 1e-6,
    dense_limit: int = 500,
    lanczos_tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int | None = None,
) -> ConvexityReport:
    r"""Definiteness of a Hessian: of ``f`` at ``x``, of an operator, or of ``f`` over a set.

    * ``convexity(f, x)``: the Hessian of ``f: Tensor -> scalar`` at ``x``; with the
      gradient, a point that is indefinite with :math:`\|\nabla f\| \le \mathrm{gtol}`
      is reported as a saddle (``is_saddle``).
    * ``convexity(A)``: a symmetric operator (``HessianOperator`` of a model's loss, ...) or
      a square tensor.
    * ``convexity(f, points=P)`` (``P`` of shape ``(N, *x.shape)``), ``box=(lo, hi)`` with
      ``x`` giving the shape (``num_points`` uniform samples), or ``segment=(x0, x1)``
      (``num_points`` evenly spaced points): every point is examined; the verdict is that
      of the smallest and largest eigenvalue over all of them.

    A square tensor (or :class:`~hesse.operators.DenseOperator`) must be symmetric to
    within ``max(1e-5, 4 eps(dtype))`` of its largest entry: ``eigh`` reads one triangle
    only, so a non-symmetric matrix would get the verdict of a matrix it is not. For the
    quadratic form :math:`x^\top A x` of a non-symmetric ``A``, pass ``(A + A.T) / 2``.

    Tolerances: ``rtol`` in [0, 1), ``atol >= 0``, ``gtol >= 0`` and ``lanczos_tol`` in
    (0, 1), each a finite real number; anything else is a ``ValueError``.

    Eigenvalues come from a dense ``eigh`` up to ``dense_limit`` unknowns, from Lanczos
    (both ends, relative residual ``lanczos_tol``) beyond. For a float16 or bfloat16
    operator the products run in its dtype and the eigenvalue problem in float32; the
    verdict is certified only where it survives the products' error (``error_floor``):
    in bfloat16 an eigenvalue within about 3% of the largest from zero has no sign.

    Example:
        >>> convexity(lambda z: z[0] ** 2 - z[1] ** 2, torch.zeros(2)).is_saddle
        True
    """
    rtol = check_real(rtol, "rtol", 0.0, 1.0, open_hi=True)
    atol = check_real(atol, "atol", 0.0)
    gtol = check_real(gtol, "gtol", 0.0)
    lanczos_tol = check_real(lanczos_tol, "lanczos_tol", 0.0, 1.0, open_lo=True, open_hi=True)
    dense_limit = check_positive_int(dense_limit, "dense_limit", 0)
    num_points = check_positive_int(num_points, "num_points")
    if max_iter is not None:
        max_iter = check_positive_int(max_iter, "max_iter")
    seed = check_seed(seed)
    report = functools.partial(
        _report_operator,
        rtol=rtol,
        atol=atol,
        dense_limit=dense_limit,
        lanczos_tol=lanczos_tol,
        seed=seed,
        max_iter=max_iter,
    )
    if isinstance(target, (CurvatureOperator, Tensor)):
        if x is not None or points is not None or box is not None or segment is not None:
            raise ValueError("an operator has no points: call convexity(A) alone")
        op = as_operator(target)
        sym = _symmetric_part(op)
        return report(op, dense=sym if op.shape[0] <= dense_limit else None)
    if not callable(target):
        raise TypeError(
            "convexity takes a function f (with x, points, box or segment), an operator or "
            f"a square tensor; got {type(target).__name__}"
        )
    f: Callable[[Tensor], Tensor] = target
    pts = _points(x, points, box, segment, num_points, seed)
    reports = []
    for p in pts:
        value, g = gradient(f, p)
        if not bool(torch.isfinite(value)) or not bool(torch.isfinite(g).all()):
            raise ValueError(f"f or its gradient is not finite at the point {p.tolist()}")
        grad_norm = float(torch.linalg.vector_norm(g))
        reports.append(report(FunctionHessian(f, p), grad_norm=grad_norm, gtol=gtol))
    if len(reports) == 1 and points is None and box is None and segment is None:
        return reports[0]
    return _aggregate(reports, pts, rtol, atol)


def _symmetric_part(op: CurvatureOperator) -> Tensor | None:
    """For a dense matrix: check that it is symmetric to within its dtype's precision and
    return its (float32 for half dtypes) symmetric part, which ``eigh`` then sees whole
    instead of one triangle. ``None`` for other operators, which are symmetric by
    construction (Hessians) or are refused here when tagged ``symmetric=False``."""
    if not isinstance(op, DenseOperator):
        if not op.symmetric:
            raise ValueError(
                f"convexity needs a symmetric operator; {type(op).__name__} is tagged "
                "symmetric=False"
            )
        return None
    A = op.A.float() if op.dtype in HALF_DTYPES else op.A
    # Relative to the largest entry, so that a matrix of tiny entries is judged by its
    # own scale (torch.allclose's default atol=1e-8 would pass any matrix below 1e-8).
    tol = max(1e-5, PRODUCT_EPS * torch.finfo(op.dtype).eps)
    scale = float(A.abs().max()) if A.numel() else 0.0
    if not torch.allclose(A, A.T, rtol=tol, atol=tol * scale):
        i, j = divmod(int((A - A.T).abs().argmax()), A.shape[1])
        raise ValueError(
            "convexity(A) expected a symmetric matrix (A == A.T to within "
            f"rtol={tol:.1g} of its largest entry), but got A[{i}, {j}] = "
            f"{float(A[i, j]):.6g} and A[{j}, {i}] = {float(A[j, i]):.6g}; the definiteness "
            "of the quadratic form x^T A x is that of its symmetric part: pass "
            "(A + A.T) / 2"
        )
    return (A + A.T) / 2  # in float32 for half dtypes, as promote(op).to_dense() would be


def _points(x, points, box, segment, num_points, seed) -> Tensor:
    given = [a is not None for a in (points, box, segment)]
    if sum(given) > 1:
        raise ValueError("give at most one of points, box and segment")
    if points is not None:
        if not isinstance(points, Tensor) or points.dim() < 1 or points.shape[0] == 0:
            raise ValueError("points must be a tensor of shape (N, *x.shape) with N >= 1")
        return points
    if segment is not None:
        x0, x1 = _check_segment(segment)
        t = torch.linspace(0, 1, num_points, dtype=x0.dtype, device=x0.device)
        return x0[None] + t.reshape(-1, *([1] * x0.dim())) * (x1 - x0)[None]
    if x is None:
        raise ValueError("convexity(f, ...) needs the point x (or points, box, segment)")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {type(x).__name__}")
    if box is None:
        return x[None]
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in box)
    if bool((hi <= lo).any()):
        raise ValueError("box=(lo, hi) needs lo < hi")
    g = make_generator(seed, None, x.device)
    u = torch.rand((num_points, *x.shape), generator=g, dtype=x.dtype, device=x.device)
    return lo + u * (hi - lo)


def _check_segment(segment: object) -> tuple[Tensor, Tensor]:
    """The ends of ``segment=(x0, x1)``: two floating point tensors of one shape, dtype and
    device."""
    if not isinstance(segment, (tuple, list)) or len(segment) != 2:
        raise ValueError(f"segment must be a pair (x0, x1) of tensors, got {segment!r}")
    x0, x1 = segment
    for name, end in (("x0", x0), ("x1", x1)):
        if not isinstance(end, Tensor) or not end.is_floating_point():
            got = f"dtype {end.dtype}" if isinstance(end, Tensor) else type(end).__name__
            raise TypeError(f"segment end {name} must be a floating point tensor, got {got}")
    if x0.shape != x1.shape:
        raise ValueError(
            "segment=(x0, x1) needs ends of the same shape, got "
            f"{tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            "segment=(x0, x1) needs ends of the same dtype and device, got "
            f"{x0.dtype} on {x0.device} and {x1.dtype} on {x1.device}"
        )
    return x0, x1


def _aggregate(reports, pts, rtol, atol) -> ConvexityReport:
    lo = min(r.min_eigenvalue for r in reports)
    hi = max(r.max_eigenvalue for r in reports)
    threshold = max(atol, rtol * max(abs(lo), abs(hi)))
    worst = min(range(len(reports)), key=lambda i: reports[i].min_eigenvalue)
    nonconvex = sum(r.min_eigenvalue < -threshold for r in reports)
    return ConvexityReport(
        verdict(lo, hi, threshold),
        lo,
        hi,
        threshold,
        direction=reports[worst].direction if lo < -threshold else None,
        gradient_norm=reports[worst].gradient_norm,
        is_saddle=any(r.is_saddle for r in reports),
        exact=all(r.exact for r in reports),
        certified=all(r.certified for r in reports),
        matvecs=sum(r.matvecs for r in reports),
        residuals=reports[worst].residuals,
        points=len(reports),
        share_nonconvex=nonconvex / len(reports),
        worst_point=pts[worst],
        reports=reports,
        error_floor=max(r.error_floor for r in reports),
        dtype=reports[0].dtype,
    )
