"""Is the Hessian positive (semi)definite here, where is it not, is this a saddle?"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from hesse.linalg import ConvergenceWarning, lanczos
from hesse.linalg._common import as_operator, make_generator
from hesse.operators import CurvatureOperator, FunctionHessian
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
            bottom (top) end for a (negative) semidefinite verdict. When not, a
            :class:`~hesse.linalg.ConvergenceWarning` is raised too.
        points: the number of points examined.
        share_nonconvex: over a set, the share of points with negative curvature.
        worst_point: over a set, the point of most negative curvature.
        reports: over a set, the report of each point.
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

    @property
    def is_convex(self) -> bool:
        """Positive semidefinite (within tolerance) everywhere examined."""
        return self.verdict in (Verdict.POSITIVE_DEFINITE, Verdict.POSITIVE_SEMIDEFINITE)


def _extremes(
    op: CurvatureOperator, dense_limit: int, tol: float, seed: int | None, max_iter: int | None
):
    n = op.shape[0]
    if n <= dense_limit:
        lam, vecs = torch.linalg.eigh(op.to_dense())
        return (float(lam[0]), float(lam[-1]), vecs[:, 0], True, 0, (0.0, 0.0), (True, True))
    r = lanczos(op, k=1, which="both", tol=tol, seed=seed, max_iter=max_iter or min(n, 200))
    return (
        float(r.eigenvalues[0]),
        float(r.eigenvalues[-1]),
        r.eigenvectors[:, 0],
        False,
        r.matvecs,
        (float(r.residuals[0]), float(r.residuals[-1])),
        (bool(r.converged[0]), bool(r.converged[-1])),
    )


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
) -> ConvexityReport:
    lo, hi, vec, exact, mv, res, conv = _extremes(op, dense_limit, lanczos_tol, seed, max_iter)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the Hessian has non-finite entries at this point")
    threshold = max(atol, rtol * max(abs(lo), abs(hi)))
    v = verdict(lo, hi, threshold)
    # Ritz values lie inside the spectrum: a negative (positive) one proves negative
    # (positive) curvature, but "no negative curvature" needs the bottom end converged.
    certified = (
        v == Verdict.INDEFINITE
        or (v in (Verdict.POSITIVE_DEFINITE, Verdict.POSITIVE_SEMIDEFINITE) and conv[0])
        or (v in (Verdict.NEGATIVE_DEFINITE, Verdict.NEGATIVE_SEMIDEFINITE) and conv[1])
    )
    if not certified and warn:
        warnings.warn(
            f"convexity: the verdict {v} is not certified: Lanczos did not converge at the "
            f"end it rests on in {mv} products; raise max_iter or dense_limit",
            ConvergenceWarning,
            stacklevel=3,
        )
    direction = vec / torch.linalg.vector_norm(vec) if lo < -threshold else None
    saddle = v == Verdict.INDEFINITE and grad_norm is not None and grad_norm <= gtol
    return ConvexityReport(
        v, lo, hi, threshold, direction, grad_norm, saddle, exact, mv, res, certified=certified
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

    Eigenvalues come from a dense ``eigh`` up to ``dense_limit`` unknowns, from Lanczos
    (both ends, relative residual ``lanczos_tol``) beyond.

    Example:
        >>> convexity(lambda z: z[0] ** 2 - z[1] ** 2, torch.zeros(2)).is_saddle
        True
    """
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
        return report(as_operator(target))
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


def _points(x, points, box, segment, num_points, seed) -> Tensor:
    given = [a is not None for a in (points, box, segment)]
    if sum(given) > 1:
        raise ValueError("give at most one of points, box and segment")
    if points is not None:
        if not isinstance(points, Tensor) or points.dim() < 1 or points.shape[0] == 0:
            raise ValueError("points must be a tensor of shape (N, *x.shape) with N >= 1")
        return points
    if segment is not None:
        x0, x1 = segment
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
    )
