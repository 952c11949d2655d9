r"""One iteration of a line-search method, for every front end: a *descent* gives the
direction at a point and the first trial step along it, a *search* (by name, see
:func:`hesse.solvers.line_search`) finds the step, the descent learns from the accepted
step. ``hesse.minimize``'s line-search methods, its subsampled Newton,
:class:`hesse.optim.LBFGS` and the truncated-Newton optimizers (``NewtonCG``,
``HessianFree``, ``SubsampledNewton``) all call :func:`search_iteration`; each keeps only
its own stopping tests around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse.solvers._linesearch import (
    FLOAT32_ROUNDING,
    FLOAT64_ROUNDING,
    LineSearchResult,
    line_search,
    repeat_decrease_step,
    within_rounding,
)
from hesse.solvers._point import Point
from hesse.solvers._quasi_newton import LBFGSMemory
from hesse.solvers._subsample import reduction_ratio


class Descent:
    """A descent direction and what goes with it. ``direction(pt)`` gives ``d`` (a descent
    direction when all goes well: the iteration checks :math:`g^\\top d < 0`);
    ``steepest(pt)`` the direction that replaces it when it is not (``-g``, or ``-g``
    scaled per block); ``first_step(pt, d)`` the search's first trial step;
    ``update(old, new, alpha, d)`` learns from an accepted step :math:`\\alpha d`;
    ``reset()`` forgets what it learned (the memory of a quasi-Newton method)."""

    def direction(self, pt: Point) -> Tensor:
        raise NotImplementedError

    def steepest(self, pt: Point) -> Tensor:
        return -pt.g

    def first_step(self, pt: Point, d: Tensor) -> float:
        return 1.0

    def update(self, old: Point, new: Point, alpha: float, d: Tensor) -> None:
        pass

    def reset(self) -> None:
        pass


class LBFGSDescent(Descent):
    r"""L-BFGS's descent over a :class:`~hesse.solvers.LBFGSMemory`: the two-loop
    direction, its first step and the Powell-damped pair of each accepted step. ``scale``
    (a vector, or ``None`` for 1) multiplies the direction per block: the learning rate of
    each parameter group of :class:`hesse.optim.LBFGS` (the pair's :math:`B s` is then
    :math:`-\alpha\, \mathrm{scale} \odot g`)."""

    def __init__(self, memory: LBFGSMemory, scale: Tensor | None = None):
        self.memory, self.scale = memory, scale

    def _scaled(self, d: Tensor) -> Tensor:
        return d if self.scale is None else d * self.scale

    def direction(self, pt: Point) -> Tensor:
        return self._scaled(self.memory.direction(pt.g))

    def steepest(self, pt: Point) -> Tensor:
        return self._scaled(-pt.g)

    def first_step(self, pt: Point, d: Tensor) -> float:
        return self.memory.first_step(pt.g)

    def update(self, old: Point, new: Point, alpha: float, d: Tensor) -> None:
        self.memory.update(alpha * d, new.g - old.g, -alpha * self._scaled(old.g))

    def reset(self) -> None:
        self.memory.clear()


@dataclass(frozen=True)
class Iteration:
    """What one :func:`search_iteration` did: the ``search``'s result along the direction
    ``d`` it ended with (``slope`` :math:`= g^\\top d`), and whether ``d`` is the steepest
    direction that replaced the descent's (``restarted``: the descent's was not a descent
    direction, or its search failed)."""

    search: LineSearchResult
    d: Tensor
    slope: float
    restarted: bool

    @property
    def accepted(self) -> bool:
        return self.search.accepted

    @property
    def point(self) -> Point | None:
        """The accepted point (``None`` where no step was accepted)."""
        return self.search.payload if self.accepted else None

    @property
    def alpha(self) -> float:
        return self.search.alpha

    @property
    def step_norm(self) -> float:
        """:math:`\\|\\alpha d\\|_2`."""
        return self.search.alpha * float(torch.linalg.vector_norm(self.d))


def f_rounding(pt: Point) -> float:
    """The relative rounding of ``f`` the Armijo search allows for at ``pt``: float32's
    (:data:`~hesse.solvers._linesearch.FLOAT32_ROUNDING`) where ``f`` was computed in
    float32 (its ``value``'s dtype, else ``x``'s), float64's otherwise (a 16-bit point's
    loss is usually computed in float32 or wider, and 100 of bfloat16's roundings would be
    78% of ``f``)."""
    value = pt.value if isinstance(pt.value, Tensor) else pt.x
    return FLOAT32_ROUNDING if value.dtype == torch.float32 else FLOAT64_ROUNDING


def search_iteration(
    pt: Point,
    descent: Descent,
    evaluate: Callable[[Tensor], Point],
    search: str | None = "strong-wolfe",
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    scale: float = 1.0,
    retry: bool = True,
    d: Tensor | None = None,
) -> Iteration:
    r"""One iteration from ``pt`` (finite, ``pt.x`` set): the descent's direction ``d``
    (or the one given), replaced by ``descent.steepest(pt)`` with the descent reset
    where :math:`g^\top d` is not negative and finite; the line search ``search`` along it
    on :math:`\phi(\alpha) = f(x + \alpha d)`, evaluated by ``evaluate(x)``, from the
    first trial step ``scale * descent.first_step(pt, d)``; with ``retry``, a failed
    search along the descent's own direction resets the descent and searches once more
    along the steepest direction. An accepted step is passed to ``descent.update``. The
    Armijo search allows for the rounding of ``f`` in its dtype (:func:`f_rounding`).

    Example:
        >>> import torch
        >>> from hesse.solvers import LBFGSMemory
        >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
        >>> def evaluate(x):
        ...     return Point(x, float(x @ A @ x) / 2, g=A @ x)
        >>> pt = evaluate(torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> descent = LBFGSDescent(LBFGSMemory(size=5))
        >>> for _ in range(6):
        ...     it = search_iteration(pt, descent, evaluate)
        ...     pt = it.point
        >>> pt.f < 1e-18, it.alpha, it.search.nfev
        (True, 1.0, 1)
    """
    restarted = False
    if d is None:
        d = descent.direction(pt)
    slope = float(torch.dot(pt.g, d))
    if not (slope < 0 and math.isfinite(slope)):  # lost descent (rounding): restart
        descent.reset()
        d, restarted = descent.steepest(pt), True
        slope = float(torch.dot(pt.g, d))
    while True:
        x = pt.x

        def phi(alpha: float, x=x, d=d):
            trial = evaluate(x + alpha * d)
            return trial.f, float(torch.dot(trial.g, d)) if trial.finite else math.nan, trial

        first = scale * descent.first_step(pt, d)
        ls = line_search(search, phi, pt.f, slope, first, c1=c1, c2=c2, rounding=f_rounding(pt))
        if ls.accepted or restarted or not retry:
            break
        steepest = descent.steepest(pt)
        if torch.equal(d, steepest):
            break
        descent.reset()
        d, restarted = steepest, True
        slope = float(torch.dot(pt.g, d))
    if ls.accepted:
        descent.update(pt, ls.payload, ls.alpha, d)
    return Iteration(ls, d, slope, restarted)


class NewtonDescent(Descent):
    r"""The descent of one damped-Newton iteration (subsampled Newton, Newton-CG and
    Hessian-free with their damping): the direction ``d`` that the caller solved for, with
    its undamped model value :math:`q = g^\top d + \tfrac12 d^\top C d`; where ``d`` is
    not a descent direction, :math:`-g` with its own :math:`q` (one product ``curvature(g)``
    of :math:`C`). The first trial step is 1, or with ``repeat_decrease`` the step that
    would repeat the last decrease ``last_decrease`` (N&W eq. 3.60, capped at 1). After the
    search, :meth:`ratio` is the reduction ratio that adapts the damping
    (:func:`~hesse.solvers.lm_damping`, :func:`~hesse.solvers.martens_damping`), and
    ``last_decrease`` the decrease of an accepted step."""

    def __init__(
        self,
        d: Tensor,
        q: float,
        curvature: Callable[[Tensor], Tensor] | None = None,
        *,
        repeat_decrease: bool = False,
        last_decrease: float | None = None,
    ):
        self.d, self.q, self.curvature = d, q, curvature
        self.repeat_decrease, self.last_decrease = repeat_decrease, last_decrease

    def direction(self, pt: Point) -> Tensor:
        return self.d

    def steepest(self, pt: Point) -> Tensor:
        g = pt.g
        curv = 0.0 if self.curvature is None else float(g @ self.curvature(g))
        self.d, self.q = -g, -float(g @ g) + 0.5 * curv
        return self.d

    def first_step(self, pt: Point, d: Tensor) -> float:
        if not self.repeat_decrease:
            return 1.0
        return repeat_decrease_step(self.last_decrease, float(pt.g @ d), 1.0, cap=1.0)

    def update(self, old: Point, new: Point, alpha: float, d: Tensor) -> None:
        self.last_decrease = old.f - new.f

    def ratio(self, pt: Point, it: Iteration) -> float:
        """Actual over predicted reduction of the undamped model along the step
        (:func:`~hesse.solvers.reduction_ratio`); :math:`-\\infty` for a failed search."""
        if not it.accepted:
            return -math.inf
        return reduction_ratio(pt.f, it.search.f, it.alpha, it.slope, self.q)

    def informative(self, pt: Point, it: Iteration) -> bool:
        """Whether :meth:`ratio` says anything of the model: not for an accepted step whose
        change of ``f`` is within ``f``'s rounding (:func:`f_rounding`), where the ratio
        is rounding noise; a damping adapted by it there grows at random (from 2e-10 to
        3.2 in 8 such steps of a float32 run near its minimum)."""
        return not (it.accepted and within_rounding(it.point.f, pt.f, f_rounding(pt)))
