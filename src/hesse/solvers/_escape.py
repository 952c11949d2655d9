r"""Leaving a saddle point: at a stationary point the gradient test cannot tell a minimum
from a saddle; the curvature can. A direction :math:`v` with :math:`v^\top B v < 0`
(:func:`negative_curvature`) decreases :math:`f` to second order whatever the gradient,
and :func:`escape_saddle` finds a step along it that does (Nocedal & Wright 2006, §4.3 and
§6.3, on second-order necessary conditions; Moré & Sorensen 1979, on directions of
negative curvature).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hesse.linalg import lanczos


def negative_curvature(B: object, *, max_iter: int = 20) -> tuple[float, Tensor]:
    r"""The smallest curvature of the symmetric :math:`B` and a unit vector along which it
    is reached: from the eigendecomposition when ``B`` is a dense tensor, else the
    smallest Ritz pair of Lanczos on at most ``max_iter`` products.

    A Ritz value is the Rayleigh quotient of its (unit) Ritz vector, so
    :math:`\theta < 0` already proves negative curvature along that vector; no residual
    is needed, and a search that finds none within the budget finds none.

    Example:
        >>> B = torch.diag(torch.tensor([2.0, -3.0, 1.0], dtype=torch.float64))
        >>> lam, v = negative_curvature(B)
        >>> lam, v.abs().tolist()
        (-3.0, [0.0, 1.0, 0.0])
    """
    if isinstance(B, Tensor):
        evals, vecs = torch.linalg.eigh(B)
        return float(evals[0]), vecs[:, 0]
    n = B.shape[0]  # type: ignore[attr-defined]
    r = lanczos(B, 1, "smallest", tol=1e-2, max_iter=min(n, max_iter), seed=0)
    return float(r.eigenvalues[0]), r.eigenvectors[:, 0]


@dataclass(frozen=True)
class EscapeStep:
    """A step out of a saddle: the point ``x + step * direction``.

    Attributes:
        step: the length :math:`t` (``direction`` is a unit vector).
        direction: :math:`d = \\pm v`, the sign that makes :math:`g^\\top d \\le 0`.
        value: :math:`f` at the new point.
        payload: what ``phi`` returned with it (the caller's point).
        trials: evaluations spent.
    """

    step: float
    direction: Tensor
    value: float
    payload: Any
    trials: int


def escape_direction(g: Tensor, v: Tensor) -> Tensor:
    r""":math:`v` or :math:`-v`, whichever does not increase :math:`f` to first order
    (:math:`g^\top d \le 0`; at an exact saddle, :math:`v`)."""
    return v if float(torch.dot(g, v)) <= 0 else -v


def escape_saddle(
    phi: Callable[[Tensor], tuple[float, Any]],
    x: Tensor,
    f: float,
    g: Tensor,
    curvature: float,
    v: Tensor,
    *,
    c: float = 1e-4,
    max_halvings: int = 40,
) -> EscapeStep | None:
    r"""A step from the (near-)stationary point ``x`` along the unit direction ``v`` of
    curvature ``curvature`` :math:`= \lambda < 0`.

    The direction is :func:`escape_direction`; the step :math:`t` starts at
    :math:`\max(1, \|x\|)^{1/2}` and is halved until

    .. math:: f(x + t d) < f(x) - c\,\tfrac12 |\lambda|\, t^2,

    the second-order analogue of the Armijo condition (the slope is zero there; the
    quadratic model promises :math:`\tfrac12 |\lambda| t^2`). ``phi(y)`` returns
    :math:`f(y)` (NaN where ``y`` is not acceptable, e.g. a non-finite gradient) and a
    payload handed back in the result. Returns ``None`` when ``max_halvings`` halvings
    found no such step (a saddle that no step along ``v`` can leave).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> def phi(y):
        ...     return float(0.5 * y @ A @ y + (y @ y) ** 2), None
        >>> x = torch.zeros(2, dtype=torch.float64)
        >>> v = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> s = escape_saddle(phi, x, 0.0, torch.zeros_like(x), -2.0, v)
        >>> s.step, s.direction.tolist()  # f(t v) = -t^2 + t^4: 0 at t = 1, < 0 at t = 1/2
        (0.5, [0.0, 1.0])
    """
    d = escape_direction(g, v)
    t = max(1.0, float(torch.linalg.vector_norm(x))) ** 0.5
    for k in range(max_halvings):
        value, payload = phi(x + t * d)
        if math.isfinite(value) and value < f - c * 0.5 * abs(curvature) * t * t:
            return EscapeStep(t, d, value, payload, k + 1)
        t *= 0.5
    return None
