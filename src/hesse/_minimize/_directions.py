"""The search directions of the line-search methods, and the models of the trust-region
methods: thin state around the mathematics of :mod:`hesse.solvers`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hesse._minimize._objective import Objective, Point
from hesse.solvers import (
    DampedSubproblem,
    Descent,
    ExactSubproblem,
    LBFGSDescent,
    LBFGSMemory,
    NielsenDamping,
    SteihaugPath,
    TrustRadius,
    TrustSubproblem,
    bfgs_update,
    cholesky_newton,
    curvature_pair,
    dfp_update,
    eigen_newton,
    forcing_rtol,
    initial_scale,
    initial_step,
    repeat_decrease_step,
    sr1_update,
    truncated_newton,
)


class Direction(Descent):
    """A :class:`~hesse.solvers.Descent` of ``hesse.minimize`` over an
    :class:`Objective` (which gives the Hessian at a point where the method needs it):
    ``direction(pt)`` gives ``d`` with ``g'd < 0``; ``update`` learns from an accepted step
    ``s = alpha d``; ``reset`` forgets."""

    needs_graph = False  # does direction() take Hessian-vector products at pt?
    second_order = False

    def __init__(self, obj: Objective, options: dict):
        self.obj = obj


class Gradient(Direction):
    """Steepest descent, with Nocedal & Wright's initial step (eq. 3.60): the step that
    would repeat the last decrease, ``2 (f_k - f_{k-1}) / g'd``."""

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self.last_decrease: float | None = None

    def direction(self, pt):
        return -pt.g

    def update(self, old, new, alpha, d):
        self.last_decrease = old.f - new.f

    def first_step(self, pt, d):
        default = initial_step(pt.g)
        return repeat_decrease_step(self.last_decrease, float(torch.dot(pt.g, d)), default)


class Newton(Direction):
    """The Newton direction of the dense Hessian, corrected when it is not positive definite."""

    needs_graph = True
    second_order = True

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self.correction = options["correction"]

    def direction(self, pt):
        H = self.obj.hessian(pt)
        if self.correction == "cholesky":
            return cholesky_newton(H, pt.g).direction
        return eigen_newton(H, pt.g, self.correction).direction


class NewtonCG(Direction):
    """Truncated CG on :math:`H p = -g` to the forcing tolerance; at negative curvature the
    iterate so far, or the steepest descent direction if there is none (N&W Algorithm 7.1).

    The first trial step is :math:`\\min(1, 2.02 (f_{k-1} - f_k) / (-g^\\top d))` (the
    step that would repeat the last decrease, as scipy's Newton-CG does): a truncated
    direction far from the solution is often too long, and on the 100-dimensional
    Rosenbrock function this halves the function evaluations (722 to 315). Near a solution
    the bound exceeds 1 and the full Newton step is tried.
    """

    needs_graph = True
    second_order = True

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self.max_cg = options["cg_max_iter"] or 20 * obj.n
        self.last_decrease: float | None = None

    def reset(self):
        self.last_decrease = None

    def update(self, old, new, alpha, d):
        self.last_decrease = old.f - new.f

    def first_step(self, pt, d):
        slope = float(torch.dot(pt.g, d))
        return repeat_decrease_step(self.last_decrease, slope, default=1.0, cap=1.0)

    def direction(self, pt):
        op = self.obj.operator(pt)
        return truncated_newton(op, pt.g, rtol=forcing_rtol(pt.g_norm(2)), max_iter=self.max_cg)[0]


class InverseUpdate(Direction):
    """BFGS or DFP: a dense inverse-Hessian approximation :math:`H`, :math:`d = -H g`,
    started as :math:`\\gamma I` after the first step (N&W eq. 6.20), updated with Powell's
    damping when the line search does not ensure :math:`s^\\top y > 0`."""

    def __init__(self, obj, options, update):
        super().__init__(obj, options)
        self.update_fn = update
        self.H: Tensor | None = None

    def reset(self):
        self.H = None

    def direction(self, pt):
        return -pt.g if self.H is None else -(self.H @ pt.g)

    def first_step(self, pt, d):
        return initial_step(pt.g) if self.H is None else 1.0

    def update(self, old, new, alpha, d):
        pair = curvature_pair(alpha * d, new.g - old.g, -alpha * old.g)
        if pair is None:
            return
        s, y = pair
        if self.H is None:
            self.H = initial_scale(s, y) * torch.eye(s.numel(), dtype=s.dtype, device=s.device)
        self.H = self.update_fn(self.H, s, y)


def bfgs(obj, options):
    return InverseUpdate(obj, options, bfgs_update)


def dfp(obj, options):
    return InverseUpdate(obj, options, dfp_update)


class LBFGS(LBFGSDescent, Direction):
    """L-BFGS: the two-loop recursion over the last ``memory`` pairs,
    :class:`~hesse.solvers.LBFGSDescent`, the descent :class:`hesse.optim.LBFGS` uses."""

    def __init__(self, obj, options):
        Direction.__init__(self, obj, options)
        LBFGSDescent.__init__(self, LBFGSMemory(size=options["memory"]))


# -- trust regions ---------------------------------------------------------------------
class TrustModel:
    """A trust-region method: ``subproblem(pt)`` is the model built at ``pt`` (a
    :class:`~hesse.solvers.TrustSubproblem`), ``size_rule()`` the rule for its size
    (:class:`~hesse.solvers.TrustRadius` or :class:`~hesse.solvers.NielsenDamping`),
    ``observe`` learns from a finite trial point (SR1), ``hessian(pt)`` is the dense
    Hessian where the model is built on it (also used for the saddle test), else ``None``."""

    graph = True  # evaluate the points with the gradient's graph (Hessian products)
    trial_graph = True  # likewise the trial points

    def __init__(self, obj: Objective, options: dict):
        self.obj = obj
        self.radius = options.get("initial_radius", 1.0)
        self.max_radius = options.get("max_radius", math.inf)

    def size_rule(self) -> TrustRadius | NielsenDamping:
        return TrustRadius(self.radius, self.max_radius)

    def hessian(self, pt: Point) -> Tensor | None:
        return None

    def subproblem(self, pt: Point) -> TrustSubproblem:
        raise NotImplementedError

    def observe(self, old: Point, trial: Point, p: Tensor, first: bool) -> None:
        pass


class _DenseHessian(TrustModel):
    """A model on the dense Hessian, formed once per point."""

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self._H, self._at = None, None

    def hessian(self, pt):
        if self._at is not pt:
            self._H, self._at = self.obj.hessian(pt), pt
        return self._H


class TrustNCG(TrustModel):
    """trust-ncg: the Steihaug-Toint CG path on Hessian-vector products, to the forcing
    tolerance; a rejected step re-cuts the same path, for free."""

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self.max_cg = options["cg_max_iter"] or 20 * obj.n
        self._path, self._at = None, None

    def subproblem(self, pt):
        if self._at is not pt:
            rtol = forcing_rtol(pt.g_norm(2))
            self._path = SteihaugPath(self.obj.operator(pt), pt.g, rtol=rtol, max_iter=self.max_cg)
            self._at = pt
        return self._path


class TrustExact(_DenseHessian):
    """trust-exact: the exact subproblem on the dense Hessian (Moré-Sorensen)."""

    def subproblem(self, pt):
        return ExactSubproblem(self.hessian(pt), pt.g)


class LevenbergMarquardt(_DenseHessian):
    """newton with ``correction="lm"``: the damped Newton step on the dense Hessian, the
    damping adapted by the reduction ratio (Nielsen)."""

    def size_rule(self):
        return NielsenDamping()

    def subproblem(self, pt):
        return DampedSubproblem(self.hessian(pt), pt.g)


class SR1(TrustModel):
    """sr1: the exact subproblem on a symmetric-rank-1 approximation :math:`B`, started
    as :math:`I`, scaled after the first trial by :math:`y^\top y / s^\top y` (N&W eq.
    6.20) and updated at every finite trial point, accepted or not."""

    graph = False

    def __init__(self, obj, options):
        super().__init__(obj, options)
        self.B = torch.eye(obj.n, dtype=obj.dtype, device=obj.device)

    def subproblem(self, pt):
        return ExactSubproblem(self.B, pt.g)

    def observe(self, old, trial, p, first):
        s, y = p, trial.g - old.g
        if first and float(torch.dot(s, y)) > 0:
            self.B = self.B * (float(torch.dot(y, y)) / float(torch.dot(s, y)))
        self.B = sr1_update(self.B, s, y)


#: The trust-region methods of :func:`hesse.minimize`.
TRUST_MODELS = {
    "trust-ncg": TrustNCG,
    "trust-exact": TrustExact,
    "sr1": SR1,
    "newton": LevenbergMarquardt,  # with correction="lm"
}
