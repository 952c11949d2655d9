r"""Quasi-Newton updates, written once: BFGS and DFP (rank-2, of the inverse Hessian),
SR1 (rank-1, of the Hessian), and the L-BFGS two-loop recursion.

Notation (Nocedal & Wright 2006, ch. 6 and 7): :math:`s = x_{k+1} - x_k`,
:math:`y = \nabla f_{k+1} - \nabla f_k`, :math:`H \approx \nabla^2 f^{-1}`,
:math:`B \approx \nabla^2 f`. The updates are pure functions of tensors; the L-BFGS memory
is a small state object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hesse.solvers._linesearch import initial_step

#: Powell's damping threshold (Nocedal & Wright, Procedure 18.2).
DAMPING_THRESHOLD = 0.2


def curvature_pair(
    s: Tensor, y: Tensor, Bs: Tensor | None = None, *, damping: bool = True
) -> tuple[Tensor, Tensor] | None:
    r"""The pair to update with, or ``None`` when no update is safe.

    BFGS and DFP keep :math:`H` positive definite only if :math:`s^\top y > 0`. A strong
    Wolfe line search guarantees it; a backtracking one does not. With ``damping`` and
    :math:`B s` known, Powell's damping replaces :math:`y` by
    :math:`r = \theta y + (1-\theta) B s` with :math:`\theta` chosen so that
    :math:`s^\top r \ge 0.2\, s^\top B s`. After a line search along
    :math:`d = -H g`, :math:`B s = \alpha B d = -\alpha g` exactly, so the damping needs no
    :math:`B`. Without it, a pair with :math:`s^\top y \le \epsilon \|s\| \|y\|` is skipped.
    """
    sy = torch.dot(s, y)
    eps = torch.finfo(s.dtype).eps
    if damping and Bs is not None:
        sBs = torch.dot(s, Bs)
        if float(sBs) > 0 and float(sy) < DAMPING_THRESHOLD * float(sBs):
            theta = (1.0 - DAMPING_THRESHOLD) * sBs / (sBs - sy)
            y = theta * y + (1.0 - theta) * Bs
            sy = torch.dot(s, y)
    if not float(sy) > eps * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
        return None
    return s, y


def bfgs_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    r"""The BFGS update of the inverse Hessian (N&W eq. 6.17), for :math:`s^\top y > 0`:

    .. math:: H_+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top,
        \quad \rho = 1 / y^\top s.

    Example:
        >>> H = bfgs_update(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
        >>> H @ torch.tensor([2.0, 0.0])  # the secant equation H y = s
        tensor([1., 0.])
    """
    rho = 1.0 / torch.dot(y, s)
    Hy = H @ y
    yHy = torch.dot(y, Hy)
    # Expanded: H + rho^2 (y'Hy) ss' + rho ss' - rho (Hy s' + s y'H), for symmetric H.
    return (
        H
        + (rho * rho * yHy + rho) * torch.outer(s, s)
        - rho * (torch.outer(Hy, s) + torch.outer(s, Hy))
    )


def dfp_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    r"""The DFP update of the inverse Hessian (N&W eq. 6.15), for :math:`s^\top y > 0`:

    .. math:: H_+ = H - \frac{H y y^\top H}{y^\top H y} + \frac{s s^\top}{y^\top s}.

    Example:
        >>> H = dfp_update(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
        >>> H @ torch.tensor([2.0, 0.0])
        tensor([1., 0.])
    """
    Hy = H @ y
    return H - torch.outer(Hy, Hy) / torch.dot(y, Hy) + torch.outer(s, s) / torch.dot(y, s)


def sr1_update(B: Tensor, s: Tensor, y: Tensor, *, skip: float = 1e-8) -> Tensor:
    r"""The symmetric rank-1 update of the Hessian approximation (N&W eq. 6.24):

    .. math:: B_+ = B + \frac{(y - Bs)(y - Bs)^\top}{(y - Bs)^\top s},

    skipped (``B`` returned) when :math:`|(y-Bs)^\top s| < r \|s\| \|y - Bs\|` with
    :math:`r` = ``skip`` (N&W eq. 6.26), which keeps the update bounded. SR1 may make
    :math:`B` indefinite, as the true Hessian may be; it is used inside a trust region.

    Example:
        >>> sr1_update(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]))
        tensor([[3., 0.],
                [0., 1.]])
    """
    v = y - B @ s
    vs = torch.dot(v, s)
    if float(vs.abs()) <= skip * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(v)):
        return B
    return B + torch.outer(v, v) / vs


def initial_scale(s: Tensor, y: Tensor) -> float:
    r""":math:`\gamma = s^\top y / y^\top y`, the scaling of the initial inverse Hessian
    :math:`H_0 = \gamma I` (N&W eq. 6.20), which makes the first step well sized."""
    return float(torch.dot(s, y) / torch.dot(y, y))


@dataclass
class LBFGSMemory:
    r"""The last ``size`` curvature pairs of L-BFGS and the two-loop recursion over them
    (Nocedal & Wright 2006, Algorithm 7.4), with :math:`H_0 = \gamma I`,
    :math:`\gamma = s^\top y / y^\top y` of the newest pair.

    The state is plain lists of tensors (``s``, ``y``, ``rho``), which an optimizer can put
    in its ``state_dict``.

    The memory is L-BFGS's whole *descent*: :meth:`direction` (the two-loop recursion),
    :meth:`first_step` (the first trial step of the line search) and :meth:`update` (the
    curvature pair of an accepted step, Powell-damped). ``hesse.minimize(method="l-bfgs")``
    and :class:`hesse.optim.LBFGS` call these three and :func:`~hesse.solvers.line_search`,
    so that they take the same iterates.

    Example:
        >>> m = LBFGSMemory(size=5)
        >>> m.push(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 0.0]))
        >>> m.direction(torch.tensor([4.0, 2.0]))  # -H g: H y = s, and H = (s'y / y'y) I across
        tensor([-1.0000, -0.5000])
    """

    size: int = 10
    s: list[Tensor] = field(default_factory=list)
    y: list[Tensor] = field(default_factory=list)
    rho: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.s)

    def push(self, s: Tensor, y: Tensor) -> None:
        """Add a pair with :math:`s^\\top y > 0`, dropping the oldest beyond ``size``."""
        self.s.append(s)
        self.y.append(y)
        self.rho.append(1.0 / torch.dot(y, s))
        if len(self.s) > self.size:
            del self.s[0], self.y[0], self.rho[0]

    def clear(self) -> None:
        self.s.clear()
        self.y.clear()
        self.rho.clear()

    def apply(self, g: Tensor) -> Tensor:
        r""":math:`H g` for the implicit inverse Hessian (the gradient when empty)."""
        q = g.clone()
        if not self.s:
            return q
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            a = rho * torch.dot(s, q)
            q.sub_(a * y)
            alphas.append(a)
        q.mul_(torch.dot(self.s[-1], self.y[-1]) / torch.dot(self.y[-1], self.y[-1]))
        for s, y, rho, a in zip(self.s, self.y, self.rho, reversed(alphas)):
            b = rho * torch.dot(y, q)
            q.add_((a - b) * s)
        return q

    def direction(self, g: Tensor) -> Tensor:
        """The quasi-Newton direction :math:`-H g`."""
        return self.apply(g).neg_()

    def first_step(self, g: Tensor) -> float:
        r"""The line search's first trial step along the direction: 1 once there is a pair
        (:math:`H_0 = \gamma I` sizes the step), else :func:`~hesse.solvers.initial_step`
        (the direction is then :math:`-g`)."""
        return 1.0 if self.s else initial_step(g)

    def update(self, s: Tensor, y: Tensor, Bs: Tensor | None = None) -> bool:
        r"""Learn from a step ``s`` with gradient change ``y``: the pair of
        :func:`curvature_pair` (Powell-damped with ``Bs``; after a line search along
        :math:`d = -Hg`, :math:`B s = -\alpha g`), pushed unless it is unsafe. Returns
        whether a pair was kept."""
        pair = curvature_pair(s, y, Bs)
        if pair is None:
            return False
        self.push(*pair)
        return True
