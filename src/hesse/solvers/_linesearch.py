r"""Line searches along a descent direction: backtracking Armijo and strong (or weak)
Wolfe, chosen by name through :func:`line_search`, and the first trial step of a search
that has no curvature information yet (:func:`initial_step`).

Both work on the one-dimensional restriction :math:`\phi(\alpha) = f(x + \alpha d)`, given
as a function ``phi(alpha) -> (phi, phi', payload)`` (``payload`` is whatever the caller
wants back for the accepted step, such as the gradient there, so that nothing is
evaluated twice). A non-finite :math:`\phi(\alpha)` means the step left the function's
domain (or overflowed): the search shrinks the step and goes on, and never accepts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hesse._core._status import Status

Phi = Callable[[float], tuple[float, float, Any]]

#: How far a step is cut back after a non-finite trial.
NON_FINITE_SHRINK = 0.25

#: The searches :func:`line_search` knows by name.
LINE_SEARCHES = ("strong-wolfe", "wolfe", "armijo")


@dataclass(frozen=True)
class Trial:
    alpha: float
    f: float
    df: float
    payload: Any = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and math.isfinite(self.df)


@dataclass(frozen=True)
class LineSearchResult:
    """The step a line search took.

    Attributes:
        alpha: the accepted step (0.0 when no step was accepted).
        f, df: :math:`\\phi(\\alpha)` and :math:`\\phi'(\\alpha)` there.
        payload: what ``phi`` returned with them.
        nfev: evaluations of ``phi``.
        status: which condition the step meets: ``"wolfe"`` (the Wolfe conditions hold),
            ``"armijo"`` (sufficient decrease only), ``"fixed"`` (none tested: a fixed
            step, :func:`fixed_step`), or ``"failed"`` (no step with sufficient decrease
            was found, or a fixed step's value was not finite).
        message: a sentence for the user.
        outcome: how the search ended, in the vocabulary of every hesse result
            (:class:`hesse.linalg.Status`): ``"converged"`` (the search's own conditions
            hold: Wolfe for :func:`strong_wolfe`, sufficient decrease for :func:`armijo`),
            ``"max_evaluations"`` (the budget ran out; the best step with sufficient
            decrease, if any, is returned), ``"precision"`` (the bracket shrank below the
            resolution of the step), or ``"no_progress"`` (not a descent direction).
            :attr:`advice` says what to change. ``accepted`` and ``outcome`` differ: a
            Wolfe search that ran out of evaluations still returns a step.
    """

    alpha: float
    f: float
    df: float
    payload: Any
    nfev: int
    status: str
    message: str
    outcome: Status | None = None  # None: read from ``status`` (constructed by hand)

    def __post_init__(self) -> None:
        if self.status not in ("wolfe", "armijo", "fixed", "failed"):
            raise ValueError(
                f"status must be 'wolfe', 'armijo', 'fixed' or 'failed', got {self.status!r}"
            )
        outcome = self.outcome
        if outcome is None:
            outcome = Status.NO_PROGRESS if self.status == "failed" else Status.CONVERGED
        object.__setattr__(self, "outcome", Status(outcome))

    @property
    def accepted(self) -> bool:
        return self.status != "failed"

    @property
    def advice(self) -> str:
        """What to change after this search (:meth:`hesse.linalg.Status.advice`); ``""``
        when it converged."""
        return Status(self.outcome).advice(max_evals="max_evals", products="the function")


def _accept(
    t: Trial, nfev: int, status: str, message: str, outcome: Status = Status.CONVERGED
) -> LineSearchResult:
    return LineSearchResult(t.alpha, t.f, t.df, t.payload, nfev, status, message, outcome)


def _failed(f0: float, df0: float, nfev: int, message: str, outcome: Status) -> LineSearchResult:
    return LineSearchResult(0.0, f0, df0, None, nfev, "failed", message, outcome)


def _not_descent(f0: float, df0: float) -> LineSearchResult:
    message = f"not a descent direction (slope {df0:.3e})"
    return _failed(f0, df0, 0, message, Status.NO_PROGRESS)


def cubic_minimizer(a: Trial, b: Trial, lo: float, hi: float) -> float:
    """The minimiser of the cubic through two points with their slopes (Nocedal & Wright
    eq. 3.59), clipped to ``[lo, hi]``; the midpoint when the cubic has no minimiser."""
    d1 = a.df + b.df - 3.0 * (a.f - b.f) / (a.alpha - b.alpha)
    disc = d1 * d1 - a.df * b.df
    if disc >= 0 and math.isfinite(disc):
        d2 = math.copysign(math.sqrt(disc), b.alpha - a.alpha)
        denom = b.df - a.df + 2.0 * d2
        if denom != 0:
            x = b.alpha - (b.alpha - a.alpha) * (b.df + d2 - d1) / denom
            if math.isfinite(x):
                return min(max(x, lo), hi)
    return 0.5 * (lo + hi)


def repeat_decrease_step(
    last_decrease: float | None, slope: float, default: float, cap: float = math.inf
) -> float:
    r"""The first trial step that would repeat the last decrease along a line of slope
    ``slope``: :math:`1.01 \cdot 2 (f_{k-1} - f_k) / (-\phi'(0))` (Nocedal & Wright eq.
    3.60), at most ``cap``; ``default`` when there is no positive last decrease.

    Example:
        >>> repeat_decrease_step(0.5, -2.0, default=1.0)
        0.505
    """
    if last_decrease is None or not last_decrease > 0 or not slope < 0:
        return default
    return min(cap, 1.01 * 2.0 * last_decrease / -slope)


def initial_step(g: Tensor) -> float:
    r"""The first trial step along :math:`-g` (or any direction scaled like it) before
    there is curvature information: :math:`\min(1, 1/\|g\|_2)`, so that the first trial
    point is at most a unit distance away (scipy's L-BFGS-B and BFGS do the same).

    Every method that starts from steepest descent uses it (``hesse.minimize``'s gradient
    descent, BFGS, DFP, L-BFGS, NAG, and :class:`hesse.optim.LBFGS`): one rule, so that two
    front ends of one method take the same first step. (:class:`torch.optim.LBFGS` uses
    :math:`1/\|g\|_1`, which shrinks with the number of parameters.)

    Example:
        >>> initial_step(torch.tensor([3.0, 4.0]))
        0.2
        >>> initial_step(torch.tensor([0.3, 0.4]))
        1.0
    """
    norm = float(torch.linalg.vector_norm(g))
    return min(1.0, 1.0 / max(norm, 1e-300))


#: How many roundings of :math:`\phi(0)` a trial value may differ by and still be judged
#: by its slope in :func:`armijo`: 100 of float64's (the default ``rounding``); a float32
#: function's are counted by :data:`FLOAT32_ROUNDING_ULPS`.
ROUNDING_ULPS = 100
#: The same for a float32 function: 10 of its roundings (a sum over many samples in
#: blocked float32 arithmetic is good to about that; 100 would let a step up by 1e-5 of
#: ``|f|`` pass where ``f`` is a constant plus a small changing part).
FLOAT32_ROUNDING_ULPS = 10
#: ``armijo``'s default band: :data:`ROUNDING_ULPS` float64 roundings, relative.
FLOAT64_ROUNDING = ROUNDING_ULPS * 2.0**-52
FLOAT32_ROUNDING = FLOAT32_ROUNDING_ULPS * 2.0**-23


def line_search(
    kind: str | None,
    phi: Phi,
    f0: float,
    df0: float,
    alpha0: float = 1.0,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    rounding: float = FLOAT64_ROUNDING,
) -> LineSearchResult:
    """The line search named ``kind`` (one of :data:`LINE_SEARCHES`): ``"strong-wolfe"``
    and ``"wolfe"`` are :func:`strong_wolfe` with the strong or the weak curvature
    condition, ``"armijo"`` is :func:`armijo` (``c2`` unused); ``None`` is no search, the
    step ``alpha0`` (:func:`fixed_step`).

    Example:
        >>> phi = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0), None)
        >>> line_search("armijo", phi, 4.0, -4.0).alpha
        1.0
    """
    if kind is None:
        return fixed_step(phi, f0, df0, alpha0)
    if kind == "armijo":
        return armijo(phi, f0, df0, alpha0, c1=c1, rounding=rounding)
    if kind in ("strong-wolfe", "wolfe"):
        return strong_wolfe(phi, f0, df0, alpha0, c1=c1, c2=c2, strong=kind == "strong-wolfe")
    raise ValueError(f"line search must be one of {LINE_SEARCHES}, got {kind!r}")


def fixed_step(phi: Phi, f0: float, df0: float, alpha0: float = 1.0) -> LineSearchResult:
    """No search: the step ``alpha0``, taken wherever :math:`\\phi` and its slope are
    finite there (a fixed learning rate), refused where they are not or ``df0`` is not a
    descent slope.

    Example:
        >>> phi = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0), None)
        >>> r = fixed_step(phi, 4.0, -4.0, 5.0)
        >>> r.status, r.alpha, r.f
        ('fixed', 5.0, 9.0)
    """
    if not df0 < 0:
        return _not_descent(f0, df0)
    t = Trial(alpha0, *phi(alpha0))
    if not t.finite:
        message = f"f or its slope is not finite at the step {alpha0:.3e}"
        return _failed(f0, df0, 1, message, Status.NON_FINITE)
    return _accept(t, 1, "fixed", "a fixed step")


def within_rounding(f: float, f0: float, rounding: float = FLOAT64_ROUNDING) -> bool:
    """Whether ``f`` is within ``rounding`` (relative) of ``f0``."""
    return abs(f - f0) <= rounding * abs(f0)


def armijo(
    phi: Phi,
    f0: float,
    df0: float,
    alpha0: float = 1.0,
    *,
    c1: float = 1e-4,
    max_evals: int = 30,
    rounding: float = FLOAT64_ROUNDING,
) -> LineSearchResult:
    r"""Backtracking until :math:`\phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0)`.

    Each cut takes the minimiser of the quadratic through :math:`\phi(0)`,
    :math:`\phi'(0)` and :math:`\phi(\alpha)`, kept within :math:`[0.1\alpha, 0.5\alpha]`;
    a non-finite value cuts the step to a quarter.

    Where :math:`\phi(\alpha)` is within ``rounding`` (relative) of :math:`\phi(0)`
    (:data:`FLOAT64_ROUNDING` by default, :data:`FLOAT32_ROUNDING` for a float32
    function; the decrease asked for is lost in :math:`f`'s rounding, near a minimum),
    the step is judged by its slope instead, the approximate Armijo condition of
    Hager & Zhang (2005): the quadratic through the two slopes decreases enough,
    :math:`\alpha (\phi'(0) + \phi'(\alpha)) / 2 \le c_1 \alpha \phi'(0)`, that is
    :math:`\phi'(\alpha) \le (2 c_1 - 1) \phi'(0)`. Without it a Newton step there is
    cut to nothing (whichever side of :math:`\phi(0)` rounding puts :math:`\phi(\alpha)`),
    and the gradient, which resolves :math:`x` to rounding where :math:`f` resolves it to
    its square root, stops falling.

    Example:
        >>> phi = lambda a: ((a - 0.3) ** 2, 2 * (a - 0.3), None)
        >>> r = armijo(phi, 0.09, -0.6)
        >>> r.status, r.outcome == "converged", round(r.alpha, 3)
        ('armijo', True, 0.3)
    """
    if not df0 < 0:
        return _not_descent(f0, df0)
    alpha = alpha0
    for n in range(1, max_evals + 1):
        f, df, payload = phi(alpha)
        if math.isfinite(f) and f <= f0 + c1 * alpha * df0:
            return _accept(Trial(alpha, f, df, payload), n, "armijo", "sufficient decrease")
        if within_rounding(f, f0, rounding) and math.isfinite(df) and df <= (2.0 * c1 - 1.0) * df0:
            message = "sufficient decrease of the slopes' model (f at its rounding)"
            return _accept(Trial(alpha, f, df, payload), n, "armijo", message)
        if math.isfinite(f):
            curv = f - f0 - df0 * alpha
            cut = -df0 * alpha * alpha / (2.0 * curv) if curv > 0 else 0.5 * alpha
            alpha = min(max(cut, 0.1 * alpha), 0.5 * alpha)
        else:
            alpha *= NON_FINITE_SHRINK
    message = f"no sufficient decrease in {max_evals} evaluations"
    return _failed(f0, df0, max_evals, message, Status.MAX_EVALUATIONS)


def strong_wolfe(
    phi: Phi,
    f0: float,
    df0: float,
    alpha0: float = 1.0,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evals: int = 25,
    strong: bool = True,
) -> LineSearchResult:
    r"""A step satisfying the strong Wolfe conditions

    .. math::
        \phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0), \qquad
        |\phi'(\alpha)| \le c_2 |\phi'(0)|,

    by bracketing and zooming with safeguarded cubic interpolation (Nocedal & Wright 2006,
    Algorithms 3.5 and 3.6). A non-finite trial caps the steps tried after it. If the
    budget runs out, the best step with sufficient decrease is returned with status
    ``"armijo"``.

    With ``strong=False`` the curvature condition is the weak one,
    :math:`\phi'(\alpha) \ge c_2 \phi'(0)`: a step past the minimiser along the line is
    accepted when it decreases :math:`f` enough. That still guarantees
    :math:`s^\top y > 0` for quasi-Newton updates, and saves the evaluations strong Wolfe
    spends pulling such a step back (on the 100-dimensional Rosenbrock function, L-BFGS
    needs about 4% fewer evaluations).

    Example:
        >>> phi = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0), None)
        >>> r = strong_wolfe(phi, 4.0, -4.0, c2=0.1)  # a tight curvature condition
        >>> r.status, round(r.alpha, 6), r.nfev
        ('wolfe', 2.0, 2)
    """
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if not df0 < 0:
        return _not_descent(f0, df0)

    def curvature_ok(df: float) -> bool:
        return abs(df) <= -c2 * df0 if strong else df >= c2 * df0

    prev = Trial(0.0, f0, df0)
    best = prev  # the lowest point with sufficient decrease so far (alpha 0: none)
    cap = math.inf  # the smallest step seen to be non-finite
    alpha = alpha0
    n = 0
    lo = hi = None
    while n < max_evals:
        cur = Trial(alpha, *phi(alpha))
        n += 1
        if not cur.finite:
            cap = alpha
            alpha = prev.alpha + NON_FINITE_SHRINK * (alpha - prev.alpha)
            continue
        decrease = cur.f <= f0 + c1 * alpha * df0
        if decrease and cur.f < best.f:
            best = cur
        if not decrease or (n > 1 and cur.f >= prev.f):
            lo, hi = prev, cur
            break
        if curvature_ok(cur.df):
            return _accept(cur, n, "wolfe", "Wolfe conditions hold")
        if cur.df >= 0:
            lo, hi = cur, prev
            break
        # Still going down: extrapolate, by at least 1% more and at most 10 times.
        nxt = cubic_minimizer(prev, cur, alpha + 0.01 * (alpha - prev.alpha), 10.0 * alpha)
        prev, alpha = cur, min(nxt, 0.5 * (alpha + cap))
    if lo is not None and hi is not None:
        return _zoom(phi, f0, df0, lo, hi, c1, curvature_ok, n, max_evals, best)
    if best.alpha > 0:
        message = "sufficient decrease only (evaluation budget spent)"
        return _accept(best, n, "armijo", message, Status.MAX_EVALUATIONS)
    message = f"no acceptable step in {max_evals} evaluations"
    return _failed(f0, df0, n, message, Status.MAX_EVALUATIONS)


def _zoom(
    phi, f0, df0, lo: Trial, hi: Trial, c1, curvature_ok, n, max_evals, best
) -> LineSearchResult:
    """Shrink the bracket ``[lo, hi]`` (``lo``: the lowest point with sufficient decrease)
    until a point satisfies the strong Wolfe conditions."""
    collapsed = False
    while n < max_evals:
        a, b = sorted((lo.alpha, hi.alpha))
        width = b - a
        if width <= 1e-12 * max(b, 1e-300):
            collapsed = True
            break
        if hi.finite:
            alpha = cubic_minimizer(lo, hi, a + 0.1 * width, b - 0.1 * width)
        else:
            alpha = 0.5 * (a + b)
        cur = Trial(alpha, *phi(alpha))
        n += 1
        if not cur.finite:
            hi = cur
            continue
        if cur.f > f0 + c1 * alpha * df0 or cur.f >= lo.f:
            hi = cur
            continue
        if cur.f < best.f:
            best = cur
        if curvature_ok(cur.df):
            return _accept(cur, n, "wolfe", "Wolfe conditions hold")
        if cur.df * (hi.alpha - lo.alpha) >= 0:
            hi = lo
        lo = cur
    # The bracket collapses below the resolution of the step, or the budget runs out.
    outcome = Status.PRECISION if collapsed else Status.MAX_EVALUATIONS
    why = "the bracket collapsed" if collapsed else f"{max_evals} evaluations spent"
    if best.alpha > 0:
        return _accept(best, n, "armijo", f"sufficient decrease only ({why})", outcome)
    return _failed(f0, df0, n, f"no step with sufficient decrease: {why}", outcome)
