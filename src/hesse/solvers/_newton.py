r"""Newton directions for Hessians that may be singular or indefinite.

A pure Newton step :math:`-H^{-1} g` is a descent direction only when :math:`H` is positive
definite. Each correction here replaces :math:`H` by a positive definite :math:`\tilde H`
close to it (Nocedal & Wright 2006, sec. 3.4):

* ``"eigen-flip"``: :math:`\tilde H = Q\,\max(|\Lambda|, \delta)\,Q^\top` — negative
  curvature becomes positive curvature of the same size, so the step moves *away* from a
  saddle along those directions (Murray 1972; Dauphin et al. 2014);
* ``"eigen-clip"``: :math:`\tilde H = Q\,\max(\Lambda, \delta)\,Q^\top`;
* ``"cholesky"``: :math:`\tilde H = H + \tau I` with the smallest :math:`\tau` of a doubling
  sequence for which a Cholesky factorisation succeeds (N&W Algorithm 3.3);
* ``"lm"``: :math:`\tilde H = H + \mu I` for a damping :math:`\mu` the caller adapts from
  the ratio of actual to predicted reduction (Levenberg-Marquardt; Nielsen 1999);
  :func:`damped_newton_step` is that solve with the eigenvalue correction as its fallback
  when :math:`H + \mu I` is indefinite.

Subsampled Newton methods measure :math:`H` on a subsample of the data whose size
:func:`subsample_size` lets grow as the gradient shrinks.

The floor :math:`\delta = \sqrt{\epsilon}\,\max(1, \max|\lambda|)` keeps a singular
Hessian (Powell's singular function at its solution) from giving an infinite step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse.linalg import SolveResult, cg

CORRECTIONS = ("eigen-flip", "eigen-clip", "cholesky", "lm")


@dataclass(frozen=True)
class NewtonStep:
    """A modified Newton direction and what was learnt about the Hessian on the way.

    Attributes:
        direction: :math:`-\\tilde H^{-1} g`.
        shift: how far the spectrum was moved (``tau`` or ``mu``; for the eigenvalue
            corrections, the largest change of an eigenvalue).
        min_eigenvalue: the smallest eigenvalue of :math:`H`, when the correction computed
            it (the eigenvalue corrections do).
        min_eigenvector: its unit eigenvector.
        positive_definite: whether :math:`H` itself was (numerically) positive definite.
    """

    direction: Tensor
    shift: float
    min_eigenvalue: float | None = None
    min_eigenvector: Tensor | None = None
    positive_definite: bool | None = None


def eigen_floor(evals: Tensor) -> float:
    """The smallest curvature kept, relative to the largest: sqrt(eps) * max(1, max|lambda|)."""
    eps = torch.finfo(evals.dtype).eps
    return eps**0.5 * max(1.0, float(evals.abs().max()))


def eigen_newton(H: Tensor, g: Tensor, kind: str = "eigen-flip") -> NewtonStep:
    r"""The Newton direction with the Hessian's eigenvalues modified (flip or clip).

    Example:
        >>> H = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        >>> eigen_newton(H, torch.tensor([2.0, 1.0], dtype=torch.float64)).direction
        tensor([-1., -1.], dtype=torch.float64)
    """
    evals, Q = torch.linalg.eigh(0.5 * (H + H.T))
    floor = eigen_floor(evals)
    if kind == "eigen-flip":
        mod = evals.abs().clamp_min(floor)
    elif kind == "eigen-clip":
        mod = evals.clamp_min(floor)
    else:
        raise ValueError(f"kind must be 'eigen-flip' or 'eigen-clip', got {kind!r}")
    d = -(Q @ ((Q.T @ g) / mod))
    return NewtonStep(
        d,
        float((mod - evals).abs().max()),
        float(evals[0]),
        Q[:, 0],
        bool(evals[0] > floor),
    )


def shifted_cholesky(H: Tensor, shift: float) -> Tensor | None:
    """The Cholesky factor of ``H + shift * I``, or ``None`` when it is not positive definite."""
    A = H + shift * torch.eye(H.shape[0], dtype=H.dtype, device=H.device) if shift else H
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    return L


def cholesky_newton(H: Tensor, g: Tensor, beta: float = 1e-3) -> NewtonStep:
    r"""The Newton direction for :math:`H + \tau I`, :math:`\tau \ge 0` the first of
    :math:`0` (if the diagonal is positive), :math:`\beta\|H\|_F`, doubled, ... for which
    Cholesky succeeds (N&W Algorithm 3.3, "Cholesky with added multiple of the identity").

    Example:
        >>> H = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
        >>> s = cholesky_newton(H, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> s.shift > 1.0, float(s.direction @ torch.tensor([1.0, 0.0], dtype=torch.float64)) < 0
        (True, True)
    """
    b = beta * max(float(torch.linalg.matrix_norm(H)), 1.0)
    min_diag = float(H.diagonal().min())
    tau = 0.0 if min_diag > 0 else b - min_diag
    for _ in range(200):
        L = shifted_cholesky(H, tau)
        if L is not None:
            d = -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            return NewtonStep(d, tau, positive_definite=tau == 0.0)
        tau = max(2.0 * tau, b)
    raise FloatingPointError("no shift made the Hessian positive definite; is it finite?")


def damped_newton(H: Tensor, g: Tensor, mu: float) -> NewtonStep | None:
    r"""The Levenberg-Marquardt direction :math:`-(H + \mu I)^{-1} g`, or ``None`` when
    :math:`H + \mu I` is not positive definite (the caller raises :math:`\mu`)."""
    L = shifted_cholesky(H, mu)
    if L is None:
        return None
    return NewtonStep(-torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1), mu)


def damped_newton_step(H: Tensor, g: Tensor, damping: float) -> NewtonStep:
    r"""The damped Newton direction :math:`-(H + \mu I)^{-1} g` of a dense symmetric
    :math:`H`, by Cholesky; when :math:`H + \mu I` is not positive definite (an exact
    Hessian away from a minimum), the eigenvalue-modified direction
    :math:`-Q\,\max(|\Lambda|, \mu, \delta)^{-1} Q^\top g` instead (negative curvature
    flipped, as ``"eigen-flip"``, and nothing below the damping or the floor
    :math:`\delta` of :func:`eigen_floor`).

    Returns a :class:`NewtonStep` whose ``positive_definite`` says which branch ran
    (``True``: Cholesky of :math:`H + \mu I`).

    Example:
        >>> H = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        >>> s = damped_newton_step(H, torch.tensor([2.0, 1.0], dtype=torch.float64), 0.0)
        >>> s.direction, s.positive_definite
        (tensor([-1., -1.], dtype=torch.float64), False)
    """
    L = shifted_cholesky(H, damping)
    if L is not None:
        d = -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        if bool(torch.isfinite(d).all()):
            return NewtonStep(d, damping, positive_definite=True)
    evals, Q = torch.linalg.eigh(0.5 * (H + H.T))
    mod = evals.abs().clamp_min(max(damping, eigen_floor(evals)))
    d = -(Q @ ((Q.T @ g) / mod))
    return NewtonStep(
        d, float((mod - evals).abs().max()), float(evals[0]), Q[:, 0], positive_definite=False
    )


def subsample_size(base: int, n: int, g_norm: float, g0_norm: float, growth: float) -> int:
    r"""The curvature subsample's size for a gradient of norm :math:`\|g_k\|`,

    .. math:: |S_k| = \min\Big(n,\ \Big\lceil |S_0| \max\big(1,
        (\|g_0\| / \|g_k\|)^{\gamma}\big) \Big\rceil\Big),

    with :math:`\gamma` = ``growth``: a subsample that grows as the gradient shrinks. With
    the full gradient, a subsampled Hessian of relative error :math:`\varepsilon` gives
    linear convergence at a rate :math:`O(\varepsilon)` (Roosta-Khorasani & Mahoney 2019,
    Theorem 6); :math:`\varepsilon` falls as :math:`|S|^{-1/2}` (matrix concentration), so a
    subsample that grows as the gradient falls turns the rate superlinear (Byrd, Chin,
    Neveitt & Nocedal 2011, section 3; Byrd et al. 2012 grow the *gradient's* sample by a
    variance test instead). ``growth = 0`` keeps :math:`|S_0|`.

    Example:
        >>> subsample_size(1000, 100000, 1e-4, 1.0, 0.5)
        100000
        >>> subsample_size(1000, 100000, 0.25, 1.0, 0.5)
        2000
    """
    if not (growth > 0 and g_norm > 0 and g0_norm > g_norm):
        return min(base, n)
    factor = (g0_norm / g_norm) ** growth
    return int(min(n, math.ceil(base * factor)))


def lm_damping(mu: float, nu: float, rho: float) -> tuple[float, float]:
    r"""Nielsen's (1999) update of the damping from the reduction ratio :math:`\rho`:
    on success :math:`\mu \leftarrow \mu \max(1/3, 1 - (2\rho - 1)^3)`, :math:`\nu = 2`;
    on failure :math:`\mu \leftarrow \nu\mu`, :math:`\nu \leftarrow 2\nu`. Returns
    ``(mu, nu)``."""
    if rho > 0:
        return mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
    return mu * nu, 2.0 * nu


def martens_damping(damping: float, rho: float) -> float:
    r"""Martens' (2010) Levenberg-Marquardt rule for Hessian-free optimisation:
    :math:`\lambda \times 3/2` when the reduction ratio :math:`\rho < 1/4` (or is not a
    number), :math:`\lambda \times 2/3` when :math:`\rho > 3/4`."""
    if not rho >= 0.25:
        return damping * 1.5
    if rho > 0.75:
        return damping * 2.0 / 3.0
    return damping


def truncated_newton(
    A: object,
    g: Tensor,
    *,
    rtol: float,
    max_iter: int,
    M: object = None,
    x0: Tensor | None = None,
    callback=None,
) -> tuple[Tensor, SolveResult]:
    r"""The truncated-Newton (Hessian-free) direction: CG on :math:`A p = -g` to the relative
    residual ``rtol``; at negative curvature the iterate so far, or :math:`-g` if there is
    none yet; always a descent direction (N&W Algorithm 7.1).

    Returns ``(direction, cg_result)``.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        >>> g = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> d, r = truncated_newton(A, g, rtol=1e-8, max_iter=5)
        >>> d, r.status.value  # negative curvature at once: steepest descent
        (tensor([-0., -1.], dtype=torch.float64), 'negative_curvature')
    """
    r = cg(A, -g, x0, M=M, rtol=rtol, max_iter=max_iter, callback=callback)
    d = r.x
    if not bool(d.abs().max() > 0) or not float(torch.dot(d, g)) < 0:
        d = -g
    return d, r
