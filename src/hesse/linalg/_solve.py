"""Krylov solvers for ``A x = b``: conjugate gradients (with Steihaug truncation and
negative-curvature detection) and MINRES for symmetric indefinite systems."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core import NonFiniteError
from hesse._core._checks import check_real
from hesse.linalg._common import (
    NotConvergedError,
    Result,
    Status,
    advice,
    as_operator,
    check_positive_int,
    check_vector,
)
from hesse.operators import CurvatureOperator


@dataclass(frozen=True)
class SolveResult(Result):
    """The outcome of :func:`cg` or :func:`minres`.

    Attributes:
        x: the solution estimate (for Steihaug-CG, the step, inside the trust region).
        residual_norm: :math:`\\|b - A x\\|` (recursively updated).
        iterations: iterations done; ``matvecs``: products with ``A``.
        status: ``"converged"``; ``"negative_curvature"`` (a direction ``d`` with
            :math:`d^\\top A d \\le 0` was met: ``direction``, ``curvature`` hold it);
            ``"boundary"`` (Steihaug: the step reached the radius); ``"max_iterations"``;
            ``"breakdown"``; ``"non_finite"``.
        direction: the negative-curvature direction, when one was found.
        curvature: :math:`d^\\top A d / d^\\top d` for that direction.
        model: :math:`\\tfrac12 x^\\top A x - b^\\top x` at ``x`` (from :func:`cg`, tracked
            with the iterates at no extra product): the quadratic model's value, which a
            trust-region method compares with the actual reduction.
    """

    x: Tensor
    residual_norm: float
    iterations: int
    matvecs: int
    status: Status
    direction: Tensor | None = None
    curvature: float | None = None
    model: float | None = None

    @property
    def message(self) -> str:
        fix = advice(self.status, tol="rtol")  # what to change (one template per status)
        hints = {
            Status.CONVERGED: "converged",
            Status.MAX_ITERATIONS: f"not converged: {fix}",
            Status.NEGATIVE_CURVATURE: f"stopped at a direction of negative curvature; {fix}",
            Status.BOUNDARY: "the step reached the trust-region boundary",
            Status.BREAKDOWN: f"breakdown: the preconditioner is not positive definite; {fix}",
            Status.NON_FINITE: f"a product or the right-hand side is not finite; {fix}",
        }
        return (
            f"{hints[self.status]} after {self.iterations} iterations "
            f"(residual {self.residual_norm:.3e})"
        )


def check_inverse_solve(r: SolveResult, b: Tensor, rtol: float, who: str = "InverseOperator"):
    """Raise unless the CG solve ``r`` of ``A x = b`` inside a product with an inverse
    operator converged.

    :func:`cg` returns a status; a product ``A^{-1} @ v`` cannot, and its numbers are wrong
    when CG stopped early: at negative curvature the iterate is not :math:`A^{-1} b` (for
    ``diag(1, -1, 2)`` and ``b = 1`` it is ``(1.5, 1.5, 1.5)``), and without convergence
    (a singular ``A``) it can be off by any amount. So the product raises
    :class:`NotConvergedError` (:class:`hesse.NonFiniteError` for non-finite products)
    with what to change, rather than warn and return them.
    """
    if r.success:
        return
    if r.status == Status.NON_FINITE:
        raise NonFiniteError(f"{who}: a product inside CG's solve is not finite")
    if r.status == Status.NEGATIVE_CURVATURE:
        raise NotConvergedError(
            f"{who}: CG met negative curvature, a direction d with d^T A d / d^T d = "
            f"{r.curvature:.3g} <= 0, after {r.iterations} iteration(s): the operator is "
            "not positive definite (indefinite or singular), and CG cannot apply its "
            "inverse. Damp it "
            "(InverseOperator(A, damping=lam), or A.damped(lam), with lam above the "
            "magnitude of its most negative eigenvalue), or, for an indefinite but "
            "invertible A, solve with hesse.linalg.minres"
        )
    if r.status == Status.BREAKDOWN:
        raise NotConvergedError(
            f"{who}: CG broke down after {r.iterations} iteration(s): the preconditioner M "
            "is not positive definite; pass a positive definite M (or none)"
        )
    b_norm = float(torch.linalg.vector_norm(b))
    rel = r.residual_norm / b_norm if b_norm > 0 else math.inf
    raise NotConvergedError(
        f"{who}: CG did not converge to rtol={rtol:g} in {r.iterations} iterations "
        f"(relative residual {rel:.2e}), so the product would be wrong; raise max_iter, "
        "pass a preconditioner M, or, if the operator is (nearly) singular, damp it "
        "(damping=lam, or A.damped(lam))"
    )


def _as_preconditioner(M: object, n: int, dtype, device) -> Callable[[Tensor], Tensor]:
    if M is None:
        return lambda r: r
    if isinstance(M, Tensor) and M.shape == (n,):
        if not bool((M > 0).all()):  # also refuses NaN
            raise ValueError("a diagonal preconditioner must be positive and finite")
        inv = (1.0 / M).to(dtype=dtype, device=device)
        return lambda r: inv * r
    if isinstance(M, (CurvatureOperator, Tensor)):
        op = as_operator(M)
        return lambda r: op @ r
    if callable(M):
        return M
    raise TypeError(
        "M must be a diagonal (a tensor of shape (P,), applied as r / M), an operator or "
        f"tensor applying the inverse preconditioner, or a callable; got {type(M).__name__}"
    )


def _to_boundary(x: Tensor, p: Tensor, radius: float) -> tuple[Tensor, float]:
    """``(x + tau p, tau)`` with ``tau >= 0`` and ``|x + tau p| = radius``."""
    pp, xp, xx = torch.dot(p, p), torch.dot(x, p), torch.dot(x, x)
    tau = (-xp + torch.sqrt((xp * xp + pp * (radius**2 - xx)).clamp_min(0))) / pp
    return x + tau * p, float(tau)


def cg(
    A: object,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    M: object = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    radius: float | None = None,
    callback: Callable[[int, Tensor, float], None] | None = None,
) -> SolveResult:
    r"""Preconditioned conjugate gradients for :math:`A x = b`, :math:`A` symmetric.

    Stops when :math:`\|r\| \le \max(\mathrm{rtol}\,\|b\|, \mathrm{atol})`. A direction
    :math:`p` with :math:`p^\top A p \le 0` proves that :math:`A` is not positive definite:
    CG stops there with ``status="negative_curvature"``, returns the iterate so far (which
    is still a descent direction for the quadratic model) and the direction. With
    ``radius`` it is Steihaug-Toint CG for the trust-region subproblem
    :math:`\min_{\|x\|\le\Delta} \tfrac12 x^\top A x - b^\top x` from ``x0 = 0``: a step
    leaving the region, or negative curvature, is followed to the boundary.

    Args:
        A: a symmetric operator or square tensor.
        b: the right-hand side, shape ``(P,)``.
        x0: a warm start (not with ``radius``).
        M: the preconditioner's inverse: a positive diagonal ``(P,)`` (applied as
            ``r / M``), an operator, or a callable ``r -> M^{-1} r``.
        rtol, atol: residual tolerances.
        max_iter: by default ``P``... capped at 10 P for safety with a preconditioner.
        radius: the trust-region radius :math:`\Delta`.
        callback: called as ``callback(i, x_i, q_i)`` after each iteration with the iterate
            and its model value :math:`\tfrac12 x^\top A x - b^\top x` (Hessian-free
            optimisation keeps some iterates to backtrack over).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64)).x
        tensor([0.0909, 0.6364], dtype=torch.float64)
    """
    op = as_operator(A)
    n = op.shape[0]
    if not isinstance(b, Tensor) or b.shape != (n,):
        got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b must be a tensor of shape ({n},), got {got}")
    rtol, atol = check_real(rtol, "rtol"), check_real(atol, "atol")
    if radius is not None and (not radius > 0 or x0 is not None or M is not None):
        raise ValueError(
            "radius must be positive, and Steihaug-CG here starts from x0 = 0 without a "
            "preconditioner (its radius bounds the Euclidean norm of the step)"
        )
    if x0 is not None:
        x0 = check_vector(x0, n, "x0")
    max_iter = check_positive_int(max_iter if max_iter is not None else n, "max_iter")
    precond = _as_preconditioner(M, n, op.dtype, op.device)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    matvecs = 0
    r = b.clone()
    if x0 is not None:
        r = b - op @ x
        matvecs += 1
    b_norm = float(torch.linalg.vector_norm(b))
    if not math.isfinite(b_norm):
        return SolveResult(x, math.nan, 0, matvecs, Status.NON_FINITE)
    target = max(rtol * b_norm, atol)
    # q = x'Ax/2 - b'x, kept up to date: with A x = b - r, q = -x'(b + r)/2 at the start,
    # and a step t along p changes it by -t p'r + t^2 p'Ap/2 (p'r = r'z for CG's p).
    q = 0.0 if x0 is None else float(-0.5 * torch.dot(x, b + r))

    def done(x, it, status, t=None, pAp=None, **extra) -> SolveResult:
        model = q if t is None else q - t * float(rz) + 0.5 * t * t * float(pAp)
        return SolveResult(x, r_norm, it, matvecs, status, model=model, **extra)

    z = precond(r)
    p = z.clone()
    rz = torch.dot(r, z)
    r_norm = float(torch.linalg.vector_norm(r))
    for it in range(max_iter):
        if r_norm <= target:
            return done(x, it, Status.CONVERGED)
        if float(rz) <= 0:
            return done(x, it, Status.BREAKDOWN)
        Ap = op @ p
        matvecs += 1
        pAp = torch.dot(p, Ap)
        if not bool(torch.isfinite(pAp)):
            return done(x, it, Status.NON_FINITE)
        pp = torch.dot(p, p)
        if float(pAp) <= 0:
            curv = float(pAp / pp)
            if radius is None:
                return done(x, it + 1, Status.NEGATIVE_CURVATURE, direction=p, curvature=curv)
            x, t = _to_boundary(x, p, radius)
            return done(x, it + 1, Status.NEGATIVE_CURVATURE, t, pAp, direction=p, curvature=curv)
        alpha = rz / pAp
        x_next = x + alpha * p
        if radius is not None and float(torch.linalg.vector_norm(x_next)) >= radius:
            x, t = _to_boundary(x, p, radius)
            return done(x, it + 1, Status.BOUNDARY, t, pAp)
        q -= 0.5 * float(alpha * rz)
        x = x_next
        if callback is not None:
            callback(it + 1, x, q)
        r = r - alpha * Ap
        z = precond(r)
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
        r_norm = float(torch.linalg.vector_norm(r))
    return done(x, max_iter, Status.CONVERGED if r_norm <= target else Status.MAX_ITERATIONS)


def minres(
    A: object,
    b: Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    shift: float = 0.0,
) -> SolveResult:
    r"""MINRES (Paige & Saunders 1975) for :math:`(A - \sigma I) x = b` with :math:`A`
    symmetric, possibly indefinite or singular: minimises :math:`\|b - (A-\sigma I)x\|` over
    the Krylov space, so the residual never increases. For a singular consistent system it
    converges to a solution; for an inconsistent one it stops at a least-squares solution
    (``status="converged"``, ``residual_norm`` then the least-squares residual).

    Example:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
        >>> minres(A, torch.tensor([1.0, 1.0], dtype=torch.float64)).x
        tensor([ 1.0000, -0.5000], dtype=torch.float64)
    """
    op = as_operator(A)
    n = op.shape[0]
    if not isinstance(b, Tensor) or b.shape != (n,):
        got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b must be a tensor of shape ({n},), got {got}")
    rtol, atol = check_real(rtol, "rtol"), check_real(atol, "atol")
    max_iter = check_positive_int(max_iter if max_iter is not None else 5 * n, "max_iter")
    x = torch.zeros_like(b)
    beta1 = float(torch.linalg.vector_norm(b))
    if not math.isfinite(beta1):
        return SolveResult(x, math.nan, 0, 0, Status.NON_FINITE)
    if beta1 == 0.0:
        return SolveResult(x, 0.0, 0, 0, Status.CONVERGED)
    target = max(rtol * beta1, atol)
    # The recurrences of scipy.sparse.linalg.minres (after Paige & Saunders' SYMMLQ/MINRES
    # code), unpreconditioned: Lanczos on unnormalised vectors r1, r2, and the QR
    # factorisation of the tridiagonal by Givens rotations (cs, sn).
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone()
    old_beta, beta = 0.0, beta1
    dbar = epsln = 0.0
    phi_bar = beta1
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    tnorm2 = 0.0  # ||T_k||_F^2, for the estimate of ||A|| in the least-squares test
    matvecs = 0
    for it in range(1, max_iter + 1):
        v = y / beta
        y = op @ v
        matvecs += 1
        if shift:
            y = y - shift * v
        if it >= 2:
            y = y - (beta / old_beta) * r1
        alpha = float(torch.dot(v, y))
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, float(torch.linalg.vector_norm(y))
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            return SolveResult(x, phi_bar, it, matvecs, Status.NON_FINITE)
        tnorm2 += alpha**2 + old_beta**2 + beta**2
        old_eps = epsln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln = sn * beta
        dbar = -cs * beta
        gamma = math.hypot(gbar, beta)
        if gamma == 0.0:
            return SolveResult(x, phi_bar, it, matvecs, Status.BREAKDOWN)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phi_bar
        phi_bar = sn * phi_bar
        w1, w2 = w2, w
        w = (v - old_eps * w1 - delta * w2) / gamma
        x = x + phi * w
        if abs(phi_bar) <= target or beta == 0.0:
            # converged, or an invariant subspace: x is then the least-squares solution
            return SolveResult(x, abs(phi_bar), it, matvecs, Status.CONVERGED)
        # A singular, inconsistent system has no solution: stop at the least-squares one,
        # where ||A r|| / (||A|| ||r||) = sqrt(gbar^2 + dbar^2) / ||A|| is small (scipy's
        # test2); without this test x keeps growing along the null space.
        if math.hypot(gbar, dbar) <= rtol * math.sqrt(tnorm2):
            return SolveResult(x, abs(phi_bar), it, matvecs, Status.CONVERGED)
    return SolveResult(x, abs(phi_bar), max_iter, matvecs, Status.MAX_ITERATIONS)
