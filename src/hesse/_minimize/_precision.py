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
it at once rather than damping harder. The copy holds every float64 tensor of the data in
float32: half their size again in memory.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from hesse._core._status import Status
from hesse._minimize._finite_sum import FiniteSum
from hesse._minimize._objective import Objective
from hesse._minimize._run import Run, Stop
from hesse.func._io import map_tensors

PRECISIONS = ("full", "mixed")
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
            max(1, parent.max_fev - parent.obj.counts.nfev),
            None,
            False,
            False,
            parent.curvature_tol,
        )
        self.retry_rejected = False


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
    if budget < 1:
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
        raise ValueError(
            f"precision='mixed' evaluates the FiniteSum's loss (and hessian=, if given) on a "
            f"{low} copy of the data and at a {low} point, and it raised: {e}. Make them "
            "follow the dtype of their inputs, or use precision='full'"
        ) from e
    run.nit += sub.nit
    c, s = run.obj.counts, sub.obj.counts
    c.nfev, c.njev, c.nhev, c.nhvp = (
        c.nfev + s.nfev,
        c.njev + s.njev,
        c.nhev + s.nhev,
        c.nhvp + s.nhvp,
    )
    if sub.current is None or not sub.current.finite:
        return x
    # its gradient test passed, or f or x stopped changing at float32's resolution (the
    # usual end where the tolerance is below what float32 resolves)
    done = status in (Status.CONVERGED, Status.FTOL, Status.XTOL)
    run.damping = sub.damping if done else options["damping"]
    H = sub.curvature  # its last curvature, formed one step before its end point
    run.curvature = H.to(x.dtype) if done and H is not None else None
    return sub.current.x.to(x.dtype)
