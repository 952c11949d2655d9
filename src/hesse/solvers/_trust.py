r"""Trust regions: the subproblem :math:`\min_{\|p\| \le \Delta} g^\top p + \tfrac12 p^\top B p`
and the radius update (Nocedal & Wright 2006, ch. 4).

The subproblem is solved matrix-free by Steihaug-Toint CG (:func:`hesse.linalg.cg` with a
radius) or, for small dense :math:`B`, exactly (Moré & Sorensen 1983), here through the
eigendecomposition of :math:`B`, which also settles the "hard case" directly.
Levenberg-Marquardt is the same loop with the damping :math:`\mu` in place of the radius
(the step :math:`-(B + \mu I)^{-1} g` solves the subproblem of radius its own length).

Every method is a *subproblem* built at a point, with ``step(size) -> TrustStep | None``
(:class:`SteihaugPath`, :class:`ExactSubproblem`, :class:`DampedSubproblem`), and a *size
rule* that says which size to ask for, how it changes with the reduction ratio, when a
step is accepted and when the region is used up (:class:`TrustRadius`,
:class:`NielsenDamping`). A loop needs nothing else (``hesse.minimize``'s
``trust_region_loop``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hesse.linalg import Status
from hesse.solvers._newton import damped_newton, lm_damping

#: Accept a step when the actual reduction is at least this share of the predicted one.
ETA = 0.15


@dataclass(frozen=True)
class TrustStep:
    """A trust-region step.

    Attributes:
        step: :math:`p`.
        predicted: the model's reduction :math:`-(g^\\top p + \\tfrac12 p^\\top B p) \\ge 0`.
        on_boundary: whether :math:`\\|p\\| = \\Delta` (within rounding).
        products: products with :math:`B` spent (Steihaug).
        min_eigenvalue: the smallest eigenvalue of :math:`B` (exact solver), or the
            curvature of a negative-curvature direction CG met.
    """

    step: Tensor
    predicted: float
    on_boundary: bool
    products: int = 0
    min_eigenvalue: float | None = None
    min_eigenvector: Tensor | None = None


class TrustSubproblem(Protocol):
    """A model built at one point; ``step(size)`` is its step for a region of that size
    (a radius, or a damping), or ``None`` when the model has no step of that size (the
    size rule then treats it as a failed step)."""

    def step(self, size: float) -> TrustStep | None: ...


class SteihaugPath:
    r"""The Steihaug-Toint truncated CG path for :math:`\min g^\top p + \tfrac12 p^\top B p`
    (N&W Algorithm 7.2), kept so that a smaller radius costs no new product.

    CG from :math:`p_0 = 0` produces iterates of increasing norm (Steihaug 1983, Thm 2.1).
    The step for radius :math:`\Delta` is where that piecewise-linear path leaves the ball,
    or the point where CG stopped (converged to ``rtol``, or at negative curvature, which
    is followed to the boundary). After a rejected step the trust region shrinks and the
    same path is cut earlier: the segments are stored (start, direction, and the model's
    value along them), so only a larger radius makes CG go on.
    """

    def __init__(self, B: object, g: Tensor, *, rtol: float, max_iter: int):
        self.B, self.g = B, g
        self.max_iter = max_iter
        self.target = rtol * float(torch.linalg.vector_norm(g))
        self.x = torch.zeros_like(g)
        self.r = -g.clone()  # residual of B p = -g
        self.p = self.r.clone()
        self.rr = torch.dot(self.r, self.r)
        self.q = 0.0  # model value at x
        self.segments: list[tuple[Tensor, Tensor, float, float, float, float]] = []
        self.products = 0
        self.ended: Status | None = None  # CONVERGED, NEGATIVE_CURVATURE, MAX_ITERATIONS
        self.curvature: float | None = None
        self.neg_direction: Tensor | None = None

    def _extend(self, radius: float) -> None:
        """Run CG until it stops or its iterate leaves the ball of ``radius``."""
        while self.ended is None and float(torch.linalg.vector_norm(self.x)) < radius:
            if math.sqrt(float(self.rr)) <= self.target:
                self.ended = Status.CONVERGED
                return
            if len(self.segments) >= self.max_iter:
                self.ended = Status.MAX_ITERATIONS
                return
            Bp = self.B @ self.p
            self.products += 1
            pBp = float(torch.dot(self.p, Bp))
            rr = float(self.rr)
            # The segment x + t p, t in [0, t_end], with model q - t rr + t^2 pBp / 2.
            if pBp <= 0:
                self.curvature = pBp / float(torch.dot(self.p, self.p))
                self.neg_direction = self.p
                self.segments.append((self.x, self.p, math.inf, self.q, rr, pBp))
                self.ended = Status.NEGATIVE_CURVATURE
                return
            alpha = rr / pBp
            self.segments.append((self.x, self.p, alpha, self.q, rr, pBp))
            self.x = self.x + alpha * self.p
            self.q -= 0.5 * alpha * rr
            self.r = self.r - alpha * Bp
            rr_next = torch.dot(self.r, self.r)
            self.p = self.r + (rr_next / self.rr) * self.p
            self.rr = rr_next

    def step(self, radius: float) -> TrustStep:
        self._extend(radius)
        for x, p, t_end, q, rr, pBp in self.segments:
            end_norm = (
                math.inf if math.isinf(t_end) else float(torch.linalg.vector_norm(x + t_end * p))
            )
            if end_norm >= radius:
                pp, xp, xx = float(torch.dot(p, p)), float(torch.dot(x, p)), float(torch.dot(x, x))
                t = (-xp + math.sqrt(max(xp * xp + pp * (radius * radius - xx), 0.0))) / pp
                model = q - t * rr + 0.5 * t * t * pBp
                return TrustStep(
                    x + t * p, -model, True, self.products, self.curvature, self.neg_direction
                )
        return TrustStep(self.x, -self.q, False, self.products, self.curvature, self.neg_direction)


def steihaug_step(B: object, g: Tensor, radius: float, *, rtol: float, max_iter: int) -> TrustStep:
    """The Steihaug-Toint step for one radius (see :class:`SteihaugPath`).

    Example:
        >>> B = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> g = torch.tensor([-2.0, -1.0], dtype=torch.float64)
        >>> steihaug_step(B, g, 10.0, rtol=1e-10, max_iter=10).step  # interior: B^-1 (-g)
        tensor([1., 1.], dtype=torch.float64)
    """
    return SteihaugPath(B, g, rtol=rtol, max_iter=max_iter).step(radius)


class ExactSubproblem:
    r"""The subproblem with a small dense symmetric :math:`B`, solved exactly for each
    radius by :func:`exact_step` (trust-exact on the Hessian, SR1 on its approximation).

    Example:
        >>> B = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> sub = ExactSubproblem(B, torch.tensor([-2.0, -1.0], dtype=torch.float64))
        >>> sub.step(10.0).step, sub.step(10.0).on_boundary
        (tensor([1., 1.], dtype=torch.float64), False)
    """

    def __init__(self, B: Tensor, g: Tensor):
        self.B, self.g = B, g

    def step(self, radius: float) -> TrustStep:
        return exact_step(self.B, self.g, radius)


class DampedSubproblem:
    r"""Levenberg-Marquardt: for the damping :math:`\mu` the step
    :math:`p = -(B + \mu I)^{-1} g` (:func:`damped_newton`), which minimises the model
    within the radius :math:`\|p\|` (N&W Theorem 4.1), with the model's reduction
    :math:`-(g^\top p + \tfrac12 p^\top B p)`; ``None`` when :math:`B + \mu I` is not
    positive definite.

    Example:
        >>> B = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        >>> sub = DampedSubproblem(B, torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> sub.step(0.5) is None, sub.step(3.0).step
        (True, tensor([-0.2500, -0.5000], dtype=torch.float64))
    """

    def __init__(self, B: Tensor, g: Tensor):
        self.B, self.g = B, g

    def initial_damping(self) -> float:
        r"""Nielsen's start: :math:`10^{-3} \max_i |B_{ii}|` (at least :math:`10^{-15}`)."""
        return 1e-3 * max(float(self.B.diagonal().abs().max()), 1e-12)

    def step(self, mu: float) -> TrustStep | None:
        newton = damped_newton(self.B, self.g, mu)
        if newton is None:
            return None
        p, g = newton.direction, self.g
        predicted = -float(torch.dot(g, p) + 0.5 * torch.dot(p, self.B @ p))
        return TrustStep(p, predicted, False)


def exact_step(B: Tensor, g: Tensor, radius: float, *, rtol: float = 1e-10) -> TrustStep:
    r"""The exact solution of the trust-region subproblem for a small dense symmetric
    :math:`B`: :math:`p = -(B + \sigma I)^{-1} g` with :math:`\sigma \ge \max(0,
    -\lambda_1)` and :math:`\sigma(\Delta - \|p\|) = 0` (N&W Theorem 4.1).

    In the eigenbasis :math:`B = Q \Lambda Q^\top`, :math:`a = Q^\top g`,
    :math:`\|p(\sigma)\|^2 = \sum_i a_i^2 / (\lambda_i + \sigma)^2`, and :math:`\sigma` is
    the root of :math:`1/\Delta - 1/\|p(\sigma)\|` found by Newton's method, which converges
    monotonically from the left (N&W Algorithm 4.3), safeguarded by bisection. In the hard
    case (:math:`a` orthogonal to the eigenspace of :math:`\lambda_1` and
    :math:`\|p(-\lambda_1)\| < \Delta`) the step is completed along an eigenvector of
    :math:`\lambda_1` to the boundary.

    Example:
        >>> B = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        >>> s = exact_step(B, torch.tensor([1.0, 0.0], dtype=torch.float64), radius=2.0)
        >>> round(float(s.step.norm()), 6), s.on_boundary
        (2.0, True)
    """
    lam, Q = torch.linalg.eigh(0.5 * (B + B.T))
    a = Q.T @ g
    # The secular equation is scalar work on n numbers: done in numpy float64 on the host.
    lam_h = lam.detach().cpu().double().numpy()
    a2 = (a * a).detach().cpu().double().numpy()
    l1 = float(lam_h[0])
    scale = max(1.0, float(np.abs(lam_h).max()))
    tiny = float(torch.finfo(g.dtype).eps) * scale

    def pnorm(sigma: float) -> float:
        with np.errstate(over="ignore"):  # a tiny radius: sigma near 1/radius, p near 0
            return float(np.sqrt(np.sum(a2 / (lam_h + sigma) ** 2)))

    def finish(p: Tensor, boundary: bool) -> TrustStep:
        pred = -float(torch.dot(g, p) + 0.5 * torch.dot(p, B @ p))
        return TrustStep(p, pred, boundary, 0, l1, Q[:, 0])

    if l1 > tiny:
        p = -(Q @ (a / lam))
        if float(torch.linalg.vector_norm(p)) <= radius:
            return finish(p, False)
    # The hard case: the components along lambda_1's eigenspace (almost) vanish.
    hard = lam_h - l1 <= tiny**0.5 * scale
    g_norm2 = float(a2.sum())
    lo = max(0.0, -l1)
    if float(a2[hard].sum()) <= tiny * max(g_norm2, 1e-300):
        rest = torch.as_tensor(np.flatnonzero(~hard), device=g.device)
        p = -(Q[:, rest] @ (a[rest] / (lam[rest] + lo))) if len(rest) else torch.zeros_like(g)
        p_norm = float(torch.linalg.vector_norm(p))
        if p_norm <= radius:
            z = Q[:, 0]
            tau = math.sqrt(max(radius**2 - p_norm**2, 0.0))
            # Either sign solves it; take the one that does not increase g'p.
            if float(torch.dot(g, z)) > 0:
                tau = -tau
            return finish(p + tau * z, True)
    # Bracket the root: |p(sigma)| <= |g| / (lambda_1 + sigma) <= radius at sigma = hi.
    hi = lo + math.sqrt(g_norm2) / radius + tiny
    sigma = lo + max(tiny, 1e-12 * (hi - lo))
    for _ in range(100):
        norm = pnorm(sigma)
        if abs(norm - radius) <= rtol * radius:
            break
        if norm > radius:
            lo = sigma
        else:
            hi = sigma
        with np.errstate(over="ignore"):  # as in pnorm: q2 = 0 bisects
            q2 = float(np.sum(a2 / (lam_h + sigma) ** 3))
        newton = sigma + (norm / radius - 1.0) * norm * norm / q2 if q2 > 0 else math.nan
        sigma = newton if lo < newton < hi else 0.5 * (lo + hi)
    p = -(Q @ (a / (lam + sigma)))
    return finish(p, True)


def update_radius(
    radius: float,
    rho: float,
    step_norm: float,
    on_boundary: bool,
    max_radius: float,
    *,
    shrink: float = 0.5,
    grow: float = 2.0,
) -> float:
    """N&W Algorithm 4.1: shrink to ``shrink`` times the step when the model was poor
    (:math:`\\rho < 1/4`, or not finite), grow by ``grow`` up to ``max_radius`` when it was
    good (:math:`\\rho > 3/4`) and the step was held back by the boundary.

    ``shrink = 0.5`` rather than N&W's 0.25: on the 100-dimensional Rosenbrock function it
    took trust-ncg 1291 Hessian-vector products instead of 1913 (``benchmarks/minimize.py``
    compares the two over the whole test set)."""
    if not rho >= 0.25:  # also NaN
        return shrink * min(step_norm, radius)
    if rho > 0.75 and on_boundary:
        return min(grow * radius, max_radius)
    return radius


class TrustRadius:
    r"""The size rule of a trust region: the radius, updated by :func:`update_radius`; a
    step is accepted when :math:`\rho > \eta` (:data:`ETA`); the region is used up when
    the radius falls below ``xtol`` relative to :math:`1 + \|x\|`.

    Example:
        >>> r = TrustRadius(1.0, 4.0)
        >>> r.update(0.9, 1.0, True); r.size(None)
        2.0
        >>> r.update(0.1, 1.0, False); r.size(None), r.accepts(0.1)
        (0.5, False)
    """

    threshold = ETA

    def __init__(self, radius: float, max_radius: float = math.inf):
        self.radius, self.max_radius = radius, max_radius

    def size(self, sub: TrustSubproblem | None) -> float:
        return self.radius

    def accepts(self, rho: float) -> bool:
        return rho > self.threshold

    def update(self, rho: float, step_norm: float, on_boundary: bool) -> None:
        self.radius = update_radius(self.radius, rho, step_norm, on_boundary, self.max_radius)

    def exhausted(self, x_norm: float, xtol: float) -> str | None:
        if self.radius <= xtol * (1.0 + x_norm):
            return "the trust region shrank to nothing without a decrease"
        return None


class NielsenDamping:
    r"""The size rule of Levenberg-Marquardt: the damping :math:`\mu`, started by the
    subproblem (:meth:`DampedSubproblem.initial_damping`) and updated by
    :func:`lm_damping`; a step is accepted when it reduces :math:`f`
    (:math:`\rho > 0`); the region is used up when :math:`\mu` is no longer finite.

    Example:
        >>> d = NielsenDamping()
        >>> d.mu = 1.0; d.update(-1.0, 0.0, False); d.mu, d.nu
        (2.0, 4.0)
    """

    threshold = 0.0

    def __init__(self) -> None:
        self.mu: float | None = None
        self.nu = 2.0

    def size(self, sub: DampedSubproblem) -> float:
        if self.mu is None:
            self.mu = sub.initial_damping()
        return self.mu

    def accepts(self, rho: float) -> bool:
        return rho > self.threshold

    def update(self, rho: float, step_norm: float, on_boundary: bool) -> None:
        self.mu, self.nu = lm_damping(self.mu, self.nu, rho)

    def exhausted(self, x_norm: float, xtol: float) -> str | None:
        if not math.isfinite(self.mu):
            return "the damping grew without bound without a decrease"
        return None
