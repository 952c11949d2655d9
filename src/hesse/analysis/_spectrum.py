"""Questions about a curvature operator: its extreme eigenvalues, trace, diagonal,
spectral density and condition number."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core._checks import check_seed
from hesse.linalg import (
    DensityResult,
    DiagonalResult,
    EigenResult,
    Status,
    TraceResult,
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    xdiag,
    xtrace,
)
from hesse.linalg import spectral_density as _slq
from hesse.linalg._common import Result, advice, as_operator, check_choice, maybe_linearize

TRACE_METHODS = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace}
DIAGONAL_METHODS = ("hutchinson", "xdiag", "exact")


def eigenvalues(
    A: object,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    linearize: bool = True,
) -> EigenResult:
    """The ``k`` extreme eigenvalues and eigenvectors of a symmetric operator (Lanczos with
    full re-orthogonalisation; see :func:`hesse.linalg.lanczos`), each with a certified
    residual. A model's curvature operator is linearised first (``linearize=True``): its
    forward pass and graph are built once, and every product costs one backward pass.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))
        >>> eigenvalues(A, k=1, which="both", seed=0).eigenvalues.round(decimals=10)
        tensor([-1.,  3.], dtype=torch.float64)
    """
    op = maybe_linearize(as_operator(A), linearize)
    return lanczos(op, k, which, tol=tol, max_iter=max_iter, seed=seed, generator=generator)


def trace(
    A: object,
    method: str = "xtrace",
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    linearize: bool = True,
) -> TraceResult:
    """A stochastic estimate of the trace with its standard error: ``"hutchinson"``,
    ``"hutch++"`` or ``"xtrace"`` (the default; the most accurate for a given number of
    products when the spectrum decays)."""
    method = check_choice(method, "method", tuple(TRACE_METHODS))
    op = maybe_linearize(as_operator(A), linearize)
    return TRACE_METHODS[method](op, num_matvecs, seed=seed, generator=generator)


def diagonal(
    A: object,
    method: str = "xdiag",
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    linearize: bool = True,
) -> DiagonalResult:
    """The diagonal: ``"exact"`` (``P`` products), or estimated by ``"hutchinson"`` or
    ``"xdiag"`` from ``num_matvecs`` products."""
    method = check_choice(method, "method", DIAGONAL_METHODS)
    seed = check_seed(seed)  # also for "exact", which draws nothing: a bad seed is a mistake
    op = maybe_linearize(as_operator(A, allow_empty=method == "exact"), linearize)
    if method == "exact":
        return exact_diagonal(op)
    fn = hutchinson_diagonal if method == "hutchinson" else xdiag
    return fn(op, num_matvecs, seed=seed, generator=generator)


def spectral_density(
    A: object,
    *,
    num_probes: int = 10,
    steps: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    linearize: bool = True,
) -> DensityResult:
    """The spectral density by stochastic Lanczos quadrature (see
    :func:`hesse.linalg.spectral_density`)."""
    op = maybe_linearize(as_operator(A), linearize)
    return _slq(
        op,
        num_probes=num_probes,
        steps=steps,
        grid=grid,
        sigma=sigma,
        seed=seed,
        generator=generator,
    )


@dataclass(frozen=True)
class ConditionResult(Result):
    """``value = largest / smallest`` eigenvalue; ``inf`` when the smallest is not positive
    (then the operator is singular or indefinite and has no finite condition number).

    ``status`` is ``"precision"`` when the smallest eigenvalue is within its residual plus
    ``error_floor`` (the products' error, see :class:`hesse.linalg.EigenResult`) of zero:
    its sign, and so the condition number, is not resolved by products in ``dtype``."""

    value: float
    largest: float
    smallest: float
    residuals: Tensor
    matvecs: int
    status: Status
    error_floor: float
    dtype: torch.dtype

    @property
    def message(self) -> str:
        if self.success:
            return f"condition number {self.value:.4g} from {self.matvecs} products"
        fix = advice(self.status)  # what to change: the status's one template
        if self.status == Status.PRECISION:
            return (
                f"the smallest eigenvalue {self.smallest:.3g} is within the error of "
                f"{self.dtype} products ({self.error_floor:.2g}) of zero: the condition "
                f"number is not resolved; {fix}"
            )
        if self.status == Status.MAX_ITERATIONS:
            fix += " (the bottom of a Hessian converges slowly)"
        return (
            f"the extreme eigenvalues did not converge ({self.status}) after {self.matvecs} "
            f"products; {fix}"
        )


def condition_number(
    A: object,
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int | None = None,
    linearize: bool = True,
) -> ConditionResult:
    r"""The 2-norm condition number :math:`\lambda_{\max}/\lambda_{\min}` of a symmetric
    positive definite operator, from both ends of one Lanczos run. The bottom of a Hessian
    converges slowly: raise ``max_iter`` (default ``min(P, 200)``) if ``status`` says so,
    and products in a wider dtype if it says ``"precision"``."""
    op = maybe_linearize(as_operator(A), linearize)
    n = op.shape[0]
    max_iter = min(n, 200) if max_iter is None else max_iter
    r = lanczos(op, 1, "both", tol=tol, max_iter=max_iter, seed=seed)
    lo, hi = float(r.eigenvalues[0]), float(r.eigenvalues[-1])
    value = hi / lo if lo > 0 else math.inf
    status = r.status
    if r.success and abs(lo) <= float(r.residuals[0]) + r.error_floor:
        status = Status.PRECISION  # the sign of the smallest eigenvalue is unresolved
    return ConditionResult(value, hi, lo, r.residuals, r.matvecs, status, r.error_floor, r.dtype)
