"""Extreme eigenpairs of symmetric operators: Lanczos and power iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core._progress import report
from hesse.linalg._common import (
    Result,
    Status,
    advice,
    as_operator,
    check_choice,
    check_positive_int,
    check_tol,
    check_vector,
    error_floor,
    gaussian,
    make_generator,
    product_dtype,
    promote,
)

WHICH = ("largest", "smallest", "both", "magnitude")


@dataclass(frozen=True)
class EigenResult(Result):
    """Eigenpairs found by :func:`lanczos` or :func:`power_iteration`.

    Attributes:
        eigenvalues: ``(k,)``; for ``"largest"`` in decreasing order, for ``"smallest"`` in
            increasing order, for ``"both"`` the smallest ones (increasing) then the largest
            (decreasing).
        eigenvectors: ``(P, k)``, orthonormal columns.
        residuals: ``(k,)``, :math:`\\|A y - \\theta y\\|` of each pair: a certificate, since
            an eigenvalue of ``A`` lies within ``residual + error_floor`` of each
            :math:`\\theta`.
        matvecs: products with ``A``.
        converged: ``(k,)`` booleans, residual within ``max(tol * |theta|, error_floor)``.
        status: ``"converged"`` when every wanted pair converged, else why it stopped.
        tol: the relative tolerance asked for.
        error_floor: the absolute accuracy the products allow,
            ``max(A.product_rtol, 4 eps(dtype)) * max|theta|``: no residual finer than it
            proves anything, so a pair counts as converged once its residual is below it,
            whatever ``tol``; the eigenvalues are certain to within it, not to ``tol``.
        dtype: the dtype the products were computed in (the operator's). For float16 and
            bfloat16 the algebra runs in float32, and ``eigenvalues``, ``eigenvectors`` and
            ``residuals`` are float32; otherwise they have the operator's dtype.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: Tensor
    status: Status
    tol: float
    error_floor: float
    dtype: torch.dtype

    @property
    def message(self) -> str:
        if self.success:
            msg = f"{self.eigenvalues.numel()} eigenpair(s) converged in {self.matvecs} products"
            if bool((self.error_floor > self.tol * self.eigenvalues.abs()).any()):
                msg += f", to {self.error_floor:.2g}: the accuracy of {self.dtype} products"
            return msg
        done = int(self.converged.sum())
        fix = advice(self.status)
        if self.status == Status.NON_FINITE:
            fix = f"a product was not finite: {fix}"
        return (
            f"{done} of {self.converged.numel()} eigenpair(s) converged to rtol={self.tol} "
            f"({self.status}) after {self.matvecs} products; {fix}"
        )


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted Ritz values (``theta`` ascending)."""
    m = theta.numel()
    if which == "largest":
        return torch.arange(m - 1, m - 1 - min(k, m), -1)
    if which == "smallest":
        return torch.arange(min(k, m))
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)[:k]
    lo = torch.arange(min(k, m))
    hi = torch.arange(m - 1, m - 1 - min(k, m), -1)
    return torch.cat([lo, hi[~torch.isin(hi, lo)]])


def lanczos(
    A: object,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    r"""Extreme eigenpairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    Builds the Krylov basis :math:`Q_m` of :math:`A` from a random start, one product per
    step, re-orthogonalised twice against all previous vectors (so no spurious copies of
    converged eigenvalues appear), and the tridiagonal :math:`T_m = Q_m^\top A Q_m`. A Ritz
    pair :math:`(\theta, Q_m s)` of :math:`T_m` has residual
    :math:`\|A Q_m s - \theta Q_m s\| = \beta_m |s_m|` at no extra cost; the iteration stops
    as soon as each wanted pair has residual :math:`\le \mathrm{tol}\cdot|\theta|` (then an
    eigenvalue of :math:`A` lies within :math:`\mathrm{tol}\,|\theta|` of :math:`\theta`).

    Products are only as accurate as their dtype and ``A.product_rtol`` allow: a residual
    below the result's ``error_floor`` (``max(product_rtol, 4 eps) * max|theta|``) counts
    as converged, and the eigenvalues are then certain to that floor, not to ``tol`` (in
    bfloat16, about 3% of the largest eigenvalue). For a float16 or bfloat16 operator the
    products run in its dtype and the rest (basis, tridiagonal eigenproblem) in float32.

    Args:
        A: a symmetric hesse operator or a square tensor.
        k: the number of eigenpairs (per end for ``"both"``).
        which: ``"largest"``, ``"smallest"``, ``"both"`` or ``"magnitude"``.
        tol: relative residual tolerance.
        max_iter: most Lanczos steps (= products); by default ``min(P, max(60, 4k + 40))``
            — raise it for slowly converging ends such as the bottom of a Hessian.
        v0: the start vector (random normal by default).
        seed, generator: for the random start.

    Returns:
        An :class:`EigenResult`; it does not raise when not converged (see ``status``).
        Float32 for a float16 or bfloat16 operator, else in the operator's dtype.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> r = lanczos(A, k=2, seed=0, tol=1e-8)
        >>> r.eigenvalues.round(decimals=10), r.status
        (tensor([10.,  9.], dtype=torch.float64), <Status.CONVERGED: 'converged'>)
    """
    op = promote(as_operator(A))
    if not op.symmetric:
        raise ValueError(f"lanczos needs a symmetric operator; {type(op).__name__} is not")
    k = check_positive_int(k, "k")
    which = check_choice(which, "which", WHICH)
    tol = check_tol(tol)
    n = op.shape[0]
    if max_iter is not None:
        max_iter = check_positive_int(max_iter, "max_iter")
    m_max = min(n, max_iter if max_iter is not None else max(60, 4 * k + 40))
    report("budget", m_max)  # at most: Lanczos stops when the residuals are small
    dtype, device = op.dtype, op.device
    gen = make_generator(seed, generator, device, op)
    if v0 is None:
        q = gaussian(n, 1, dtype, device, gen)[:, 0]
    else:
        q = check_vector(v0, n, "v0").to(dtype=dtype, device=device).clone()
    q = q / torch.linalg.vector_norm(q)
    Q = torch.zeros(m_max, n, dtype=dtype, device=device)  # one basis vector per row
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    status = Status.MAX_ITERATIONS
    beta = torch.zeros((), dtype=dtype, device=device)
    # An eigenvalue near 0 cannot meet a relative test; like ARPACK, measure it against
    # eps^(2/3) of the largest Ritz value instead.
    zero_scale = torch.finfo(dtype).eps ** (2.0 / 3.0)
    last_breakdown: Tensor | None = None
    for j in range(m_max):
        Q[j] = q
        w = op @ q
        alpha = torch.dot(q, w)
        # full re-orthogonalisation, twice ("twice is enough", Parlett)
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        betas.append(beta)
        theta, S = _tridiag_eigh(alphas, betas[:-1])
        if not bool(torch.isfinite(theta).all()):
            status = Status.NON_FINITE
            break
        idx = _select(theta, k, which)
        res = (beta * S[-1, idx]).abs()
        top = theta.abs().max()
        noise = error_floor(op, top)  # read after each product: product_rtol may grow
        limit = (tol * theta[idx].abs().clamp_min(zero_scale * top)).clamp_min(noise)
        done = bool((res <= limit).all()) and idx.numel() == _wanted(k, which, n)
        if j + 1 == n:
            status = Status.CONVERGED  # the whole space: the Ritz values are the spectrum
            break
        if float(beta) <= math.sqrt(torch.finfo(dtype).eps) * float(top):
            # An invariant subspace: its Ritz values are exact, but a repeated eigenvalue
            # shows only once in it. Continue from a new random vector orthogonal to the
            # basis (T gets a zero off-diagonal), which finds further copies; stop only
            # once a restart no longer changes the wanted values.
            values = theta[idx]
            if (
                done
                and last_breakdown is not None
                and last_breakdown.shape == values.shape
                and bool(torch.allclose(values, last_breakdown, rtol=tol, atol=tol * float(top)))
            ):
                status = Status.CONVERGED
                break
            last_breakdown = values
            w = gaussian(n, 1, dtype, device, gen)[:, 0]
            for _ in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            betas[-1] = torch.zeros_like(beta)
            beta = torch.linalg.vector_norm(w)
        elif done:
            status = Status.CONVERGED
            break
        q = w / beta
    m = len(alphas)
    vecs = Q[:m].T @ S[:, idx]
    return EigenResult(
        eigenvalues=theta[idx],
        eigenvectors=vecs,
        residuals=res,
        matvecs=m,
        converged=res <= limit,
        status=status,
        tol=tol,
        error_floor=noise,
        dtype=product_dtype(op),
    )


def _wanted(k: int, which: str, n: int) -> int:
    return min(2 * k, n) if which == "both" else min(k, n)


def _tridiag_eigh(alphas: list[Tensor], betas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the small symmetric tridiagonal matrix (ascending)."""
    a = torch.stack(alphas)
    T = torch.diag(a)
    if betas:
        b = torch.stack(betas)
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigh(T)


def power_iteration(
    A: object,
    *,
    tol: float = 1e-3,
    max_iter: int = 1000,
    v0: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    r"""The eigenvalue of largest magnitude by power iteration (for comparison with
    :func:`lanczos`, which needs far fewer products).

    Stops when the residual :math:`\|A v - \theta v\| \le \mathrm{tol}\,|\theta|`, with
    :math:`\theta = v^\top A v` the Rayleigh quotient, or below the products' error floor
    (as for :func:`lanczos`, whose precision rules it follows).
    """
    op = promote(as_operator(A))
    tol = check_tol(tol)
    max_iter = check_positive_int(max_iter, "max_iter")
    n, dtype, device = op.shape[0], op.dtype, op.device
    gen = make_generator(seed, generator, device, op)  # always: ranks must do the same
    if v0 is None:
        v = gaussian(n, 1, dtype, device, gen)[:, 0]
    else:
        v = check_vector(v0, n, "v0").to(dtype=dtype, device=device).clone()
    v = v / torch.linalg.vector_norm(v)
    w = op @ v
    status = Status.MAX_ITERATIONS
    theta = torch.dot(v, w)
    res = torch.linalg.vector_norm(w - theta * v)
    it = 1

    def limit() -> float:
        return max(tol * abs(float(theta)), error_floor(op, abs(float(theta))))

    while it < max_iter:
        if not bool(torch.isfinite(res)):
            status = Status.NON_FINITE
            break
        if float(res) <= limit():
            status = Status.CONVERGED
            break
        norm = torch.linalg.vector_norm(w)
        if float(norm) == 0.0:
            status = Status.CONVERGED  # A v = 0: v is an eigenvector of eigenvalue 0
            break
        v = w / norm
        w = op @ v
        it += 1
        theta = torch.dot(v, w)
        res = torch.linalg.vector_norm(w - theta * v)
    else:
        if float(res) <= limit():
            status = Status.CONVERGED
    return EigenResult(
        eigenvalues=theta.reshape(1),
        eigenvectors=v.reshape(-1, 1),
        residuals=res.reshape(1),
        matvecs=it,
        converged=(res <= limit()).reshape(1),
        status=status,
        tol=tol,
        error_floor=error_floor(op, abs(float(theta))),
        dtype=product_dtype(op),
    )
