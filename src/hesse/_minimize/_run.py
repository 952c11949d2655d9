"""What every method's loop shares: counting, stopping tests, the callback, the history,
the best point, the result, and the escape from saddle points."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from hesse._core import NonFiniteError
from hesse._core._status import Status
from hesse._minimize._objective import Objective, Point
from hesse._minimize._result import STATUSES, OptimizeResult
from hesse.solvers import Tolerances, escape_saddle, negative_curvature


class Stop(Exception):
    """Raised inside a loop to end the run with a :class:`~hesse.linalg.Status` and a
    message (a string is checked against the vocabulary)."""

    def __init__(self, status: Status | str, message: str):
        super().__init__(message)
        self.status, self.message = Status(status), message


class Run:
    def __init__(
        self,
        method: str,
        obj: Objective,
        tol: Tolerances,
        max_iter: int,
        max_fev: int,
        callback,
        history: bool,
        saddle_check: bool,
        curvature_tol: float,
    ):
        self.method, self.obj, self.tol = method, obj, tol
        self.max_iter, self.max_fev = max_iter, max_fev
        self.callback = callback
        self.history: list[dict[str, Any]] | None = [] if history else None
        self.saddle_check, self.curvature_tol = saddle_check, curvature_tol
        self.nit = 0
        self.g0_norm = math.inf
        self.best: Point | None = None  # the lowest finite point evaluated
        self.current: Point | None = None  # the point the method stands at
        self.start = time.perf_counter()
        self.hess_inv: Tensor | None = None
        # subsampled Newton's damping, carried from its phases on samples to all the data
        self.damping: float | None = None
        # subsampled Newton: after a rejected step, damp harder and try again (a float32
        # stage of precision="mixed" stops instead, and float64 takes over)
        self.retry_rejected = True
        # subsampled Newton: the last dense curvature it formed, and the one a warm start
        # hands to the loop's first step (the float32 stage's, cast)
        self.curvature: Tensor | None = None
        # ... and the gradient norm its subsample's growth is measured from
        self.schedule_g0: float | None = None
        # a run that starts where f is resolved only to its rounding (after the float32
        # stage of precision="mixed"): a stop on ftol waits while the gradient falls
        self.ftol_waits_for_gradient = False

    # -- points ------------------------------------------------------------------------
    def evaluate(self, x: Tensor, graph: bool = False) -> Point:
        if self.obj.counts.nfev >= self.max_fev:
            raise Stop(Status.MAX_EVALUATIONS, f"stopped after max_fev={self.max_fev} evaluations")
        pt = self.obj.evaluate(x, graph)
        if pt.finite and (self.best is None or pt.f < self.best.f):
            self.best = pt
        return pt

    def first(self, x0: Tensor, graph: bool) -> Point:
        pt = self.evaluate(x0, graph)
        if not pt.finite:
            what = "fun(x0)" if not math.isfinite(pt.f) else "the gradient at x0"
            raise Stop(Status.NON_FINITE, f"{what} is not finite; start from a point where it is")
        self.first_point(pt)
        return pt

    def first_point(self, pt: Point) -> None:
        """Start the run at the finite ``pt`` (the start's gradient norm: ``grad_rtol``'s
        reference; a warm start's point where the method skips ``x0``, which it may only
        without a ``grad_rtol``)."""
        self.g0_norm = pt.g_norm(self.tol.norm)
        self.current = pt

    # -- stopping ----------------------------------------------------------------------
    def converged(self, pt: Point) -> bool:
        return self.tol.gradient_small(pt.g_norm(self.tol.norm), self.g0_norm)

    def after_step(self, old: Point, new: Point, step_norm: float) -> None:
        """Tests after an accepted step: budget, function change, step size, callback."""
        self.nit += 1
        self.current = new
        self.record(new)
        if self.callback is not None:
            try:
                stop = self.callback(self.result(new, "callback", ""))
            except StopIteration:
                stop = True
            if stop:
                raise Stop(Status.CALLBACK, "stopped by the callback")
        if self.converged(new):  # the loop ends it, after the saddle check
            self.check_budget()
            return
        if abs(old.f - new.f) <= self.tol.ftol * max(abs(old.f), abs(new.f), 1.0) and not (
            # ftol=0: f's change is no test. An iteration that leaves f exactly unchanged
            # (its rounding reached, the search's sufficient decrease lost in it) goes on
            # while the gradient still falls: near a minimum x is resolved by the gradient
            # far better than by f (sqrt(eps) relative)
            (self.tol.ftol == 0 or self.ftol_waits_for_gradient)
            and new.g_norm(self.tol.norm) < old.g_norm(self.tol.norm)
        ):
            raise Stop(
                Status.FTOL,
                f"the last iteration changed f by at most ftol={self.tol.ftol:.1e} (relative)",
            )
        x_norm = float(torch.linalg.vector_norm(new.x))
        if step_norm <= self.tol.xtol * (1.0 + x_norm):
            raise Stop(
                Status.XTOL, f"the last step was shorter than xtol={self.tol.xtol:.1e} (relative)"
            )
        self.check_budget()

    def check_budget(self) -> None:
        if self.nit >= self.max_iter:
            raise Stop(Status.MAX_ITERATIONS, f"stopped after max_iter={self.max_iter} iterations")

    def record(self, pt: Point) -> None:
        if self.history is None:
            return
        c = self.obj.counts
        self.history.append(
            {
                "nit": self.nit,
                "fun": pt.f,
                "grad_norm": pt.g_norm(self.tol.norm),
                "nfev": c.nfev,
                "njev": c.njev,
                "nhvp": c.nhvp,
                "nhev": c.nhev,
                "time": time.perf_counter() - self.start,
            }
        )

    # -- saddles ---------------------------------------------------------------------
    def negative_curvature(self, pt: Point, H: Tensor | None = None) -> tuple[float, Tensor] | None:
        """A direction of negative curvature at a stationary ``pt``, if there is one
        (:func:`hesse.solvers.negative_curvature`): from the dense Hessian when ``H`` is
        given, ``n <= 16``, or a FiniteSum gives it in closed form (``n <= 4096``), else
        from Lanczos on at most 20 Hessian-vector products; the curvature along the
        direction found must be below ``-curvature_tol``."""
        if not self.saddle_check:
            return None
        try:
            if H is None and self.obj.closed_form_hessian and self.obj.n <= 4096:
                H = self.obj.hessian(pt)  # cheaper than the gradient's graph and Lanczos
                if not bool(torch.isfinite(H).all()):
                    return None
            if H is None and pt.hvp is None:  # evaluated without the gradient's graph
                pt = self.obj.evaluate(pt.x, graph=True)
                if not pt.finite or pt.hvp is None:
                    return None
            if H is None and self.obj.n <= 16:
                H = self.obj.hessian(pt)
            lam, v = negative_curvature(H if H is not None else self.obj.operator(pt))
        except NonFiniteError:
            return None
        if lam < -self.curvature_tol:
            return lam, v
        return None

    def escape(self, pt: Point, lam: float, v: Tensor, graph: bool) -> Point:
        """Leave a saddle along the unit direction ``v`` of curvature ``lam < 0``
        (:func:`hesse.solvers.escape_saddle`), as one iteration."""

        def phi(y: Tensor) -> tuple[float, Point]:
            trial = self.evaluate(y, graph)
            return (trial.f if trial.finite else math.nan), trial

        out = escape_saddle(phi, pt.x, pt.f, pt.g, lam, v)
        if out is None:
            raise Stop(
                Status.NO_PROGRESS,
                f"a stationary point with negative curvature ({lam:.3e}) that no step along "
                "its direction could leave: a saddle point, not a minimum",
            )
        self.after_step(pt, out.payload, out.step)
        return out.payload

    # -- the result --------------------------------------------------------------------
    def result(self, pt: Point, status: Status | str, message: str) -> OptimizeResult:
        good = STATUSES.get(status, False) and pt.finite
        if good and status in ("ftol", "xtol"):
            # f or x stopped changing. That is a solution at this precision only if the
            # gradient is small too (within sqrt(gtol), or 1e-3 of the start's): a step cut
            # short by a trust region at a badly scaled point also changes f very little.
            g_norm = pt.g_norm(self.tol.norm)
            loose = max(self.tol.gtol**0.5, 1e-3 * self.g0_norm)
            if not g_norm <= loose:
                good = False
                message += (
                    f", but the gradient norm is still {g_norm:.3e}: progress stalled (a "
                    "badly scaled problem, or rounding); try another method or rescale x"
                )
        if not good and self.best is not None and (not pt.finite or self.best.f < pt.f):
            pt = self.best
        shape = self.obj.shape
        c = self.obj.counts
        g = pt.g if pt.g is not None else torch.full_like(pt.x, math.nan)
        return OptimizeResult(
            x=pt.x.detach().clone().view(shape),
            fun=pt.value,
            jac=g.view(shape),
            nit=self.nit,
            nfev=c.nfev,
            njev=c.njev,
            nhev=c.nhev,
            nhvp=c.nhvp,
            success=bool(good),
            status=status,
            message=message,
            method=self.method,
            hess_inv=self.hess_inv,
            history=self.history,
        )
