r"""Mixed precision for ``minimize(FiniteSum, "subsampled-newton", options={"precision":
"mixed"})`` on float64 data: the whole method (its phases on growing samples included)
runs first on a float32 copy of the data, to the run's own tolerances, and the loop in
float64 then takes over from its point: one float64 evaluation where the float32 run got
there, a few more where float32's rounding stopped it short.

Why it pays: a run over tall data costs its evaluations over all the data, each a pass over
the samples that moves half the bytes in float32 and runs on faster kernels (logistic
regression, 200,000 x 101 on this project's 2-core CPU: 14 ms against 43 ms; on a GPU with
few float64 units, far more). Why it is safe: the float32 stage is a warm start, as the
phases are; the stopping tests, the result and the reported gradient are float64's. A step
the float32 stage rejects (its rounding, not the curvature, is the likely cause there) ends
it at once rather than damping harder, and so do two iterations in a row that do not halve
the gradient. The copy holds every float64 tensor of the data in float32: half their size
again in memory.

Where float32 does not resolve the problem it costs: logistic regression with AR(1)
features of correlation 0.9999 (a curvature's condition number near 1e8), 6-7 float32
evaluations before the stage stalls and 9 float64 ones after, against 5-6 float64
evaluations in ``precision="full"``. Keep ``"full"`` there.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from hesse._core._status import Status
from hesse._minimize._finite_sum import FiniteSum
from hesse._minimize._objective import Objective
from hesse._minimize._run import Run, Stop
from hesse.func._io import map_tensors

PRECISIONS = ("full", "mixed")
#: The float32 stage ends after this many iterations in a row that did not halve the
#: gradient (subsampled Newton cuts it tenfold an iteration on a problem float32 resolves;
#: with a curvature's condition number near 1e8 float32's solves stall, and the stage had
#: spent 20 iterations before its f stopped changing).
STALLED_ITERATIONS = 2
#: Evaluations of ``max_fev`` the float32 stage leaves to float64 (its first point and
#: one step).
FLOAT64_RESERVE = 2
#: The dtype of the first stage of ``precision="mixed"``, for each dtype of ``x0``.
LOWER = {torch.float64: torch.float32}


def check_precision(value) -> str:
    if value not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS} ('mixed': first in float32 on a copy of "
            f"float64 data, then in float64), got {value!r}"
        )
    return value


def lowered(fs: FiniteSum, dtype: torch.dtype) -> FiniteSum:
    """``fs`` on a copy of its data with every float64 tensor in ``dtype``."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.dtype == torch.float64 else t

    return FiniteSum(
        fs.loss,
        map_tensors(fs.data, cast),
        regularizer=fs.regularizer,
        reduction=fs.reduction,
        hessian=fs.hessian,
        batch_size=fs.batch_size,
    )


class _StageRun(Run):
    """The float32 stage's run: the whole run's gradient tolerances, no callback, history
    or saddle check, and no second try after a rejected step. No test on f or x changes
    either (``ftol = xtol = 0``): float32 resolves f to 6e-8 of its size long before it
    stops resolving the gradient (logistic regression: f the same to the last bit across
    a step that cut the gradient from 1e-5 to 1e-6), so with ``ftol = 0`` the stage ends
    only where f stays the same and the gradient no longer falls."""

    def __init__(self, parent: Run, obj: Objective, max_iter: int):
        super().__init__(
            parent.method,
            obj,
            dataclasses.replace(parent.tol, ftol=0.0, xtol=0.0),
            max_iter,
            parent.max_fev - parent.obj.counts.nfev - FLOAT64_RESERVE,
            None,
            False,
            False,
            parent.curvature_tol,
        )
        self.retry_rejected = False
        self.slow = 0  # consecutive iterations that did not halve the gradient

    def after_step(self, old, new, step_norm: float) -> None:
        super().after_step(old, new, step_norm)
        norm = self.tol.norm
        self.slow = self.slow + 1 if new.g_norm(norm) > 0.5 * old.g_norm(norm) else 0
        if self.slow >= STALLED_ITERATIONS:
            raise Stop(
                Status.NO_PROGRESS,
                f"{STALLED_ITERATIONS} iterations in a row did not halve the gradient: "
                "float32 no longer resolves this problem (its curvature's conditioning or "
                "its rounding), float64 takes over",
            )


def lower_precision_start(run: Run, fs: FiniteSum, x: Tensor, options: dict, loop) -> Tensor:
    """The point the float64 loop starts from: ``x`` after ``loop`` (subsampled Newton,
    phases included) on :func:`lowered` data in :data:`LOWER`'s dtype for ``x``'s, or
    ``x`` where no iteration is left. Its iterations, evaluations
    (over all the data, in float32) and Hessians count in ``run``'s; where it ended well
    (its gradient test, or f or x at float32's resolution), ``run.damping`` becomes its
    damping and ``run.curvature`` its last dense curvature (cast), for the float64 loop's
    first step."""
    low = LOWER[x.dtype]
    budget = run.max_iter - run.nit - 1  # one iteration at least for float64
    if budget < 1 or run.max_fev - run.obj.counts.nfev - FLOAT64_RESERVE < 1:
        return x
    fs_low = lowered(fs, low)
    x_low = x.to(low)
    sub = _StageRun(run, Objective(fs_low, x_low.view(run.obj.shape)), budget)
    status = Status.CONVERGED
    try:
        loop(sub, fs_low, x_low, {**options, "precision": "full"})
    except Stop as stop:
        status = stop.status
    except (RuntimeError, TypeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        from hesse._minimize import OptimizeWarning

        warnings.warn(
            f"precision='mixed': the FiniteSum's loss (its regularizer, or its hessian=) "
            f"raised on the {low} copy of the data at a {low} point ({type(e).__name__}: "
            f"{e}); going on in {x.dtype} alone. Make them follow the dtype of their "
            "inputs, or use precision='full'",
            OptimizeWarning,
            stacklevel=2,
        )
        status = None
    run.nit += sub.nit
    c, s = run.obj.counts, sub.obj.counts
    c.nfev, c.njev, c.nhev, c.nhvp = (
        c.nfev + s.nfev,
        c.njev + s.njev,
        c.nhev + s.nhev,
        c.nhvp + s.nhvp,
    )
    if status is None or sub.current is None or not sub.current.finite:
        return x
    # the subsample's growth goes on in float64; where its gradient test passed, its
    # damping and curvature too; else (f and the gradient stalled at float32's
    # resolution, a rejected step, a budget) float64 starts those afresh: a damping
    # grown on rounding noise, carried, had float64's first steps change f by less than
    # ftol and the run end there
    done = status == Status.CONVERGED
    run.damping = sub.damping if done else options["damping"]
    H = sub.curvature  # its last curvature, formed one step before its end point
    run.curvature = H.to(x.dtype) if done and H is not None else None
    run.schedule_g0 = sub.schedule_g0  # the subsample's growth, from the stage's start
    run.ftol_waits_for_gradient = True  # f near its minimum already, resolved to rounding
    return sub.current.x.to(x.dtype)
