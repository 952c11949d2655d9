"""The point every optimisation loop of hesse stands at: ``x``, ``f(x)``, the gradient,
and the curvature products there."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hesse.operators import PointHessian


class Point:
    r"""One point of an optimisation: ``x`` (flat), ``f`` (a float; ``value`` the tensor
    where a front end keeps it), the flat gradient ``g`` (``None`` where ``f`` or the
    gradient is not finite), and ``hvp``, the Hessian at ``x`` applied to a flat ``V``
    (``(n,)`` or ``(n, k)``), where the point carries its curvature (``None`` where not).

    ``hesse.minimize`` builds points from a function of a tensor
    (``_minimize/_objective.py``); :mod:`hesse.optim` from a closure over a model's
    parameters (``optim._base.Evaluation``, which adds the per-parameter gradients). The
    solvers' iteration (:func:`hesse.solvers.search_iteration`) takes either.

    Example:
        >>> x = torch.tensor([3.0, 4.0])
        >>> pt = Point(x, 12.5, g=x, hvp=lambda V: V)
        >>> pt.finite, pt.g_norm(2), (pt.hessian() @ torch.ones(2)).tolist()
        (True, 5.0, [1.0, 1.0])
    """

    def __init__(
        self,
        x: Tensor | None,
        f: float,
        value: Tensor | None = None,
        g: Tensor | None = None,
        hvp: Callable[[Tensor], Tensor] | None = None,
    ):
        self.x, self.f, self.value = x, f, value
        self.g, self.hvp = g, hvp
        self._g_norm: dict[float, float] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f!r}, finite={self.finite})"

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and self.g is not None

    def g_norm(self, order: float = 2) -> float:
        """The gradient's norm of this order (computed once per order)."""
        if order not in self._g_norm:
            self._g_norm[order] = float(torch.linalg.vector_norm(self.g, ord=order))
        return self._g_norm[order]

    def hessian(self) -> PointHessian:
        """The Hessian at ``x`` as an operator over :attr:`hvp`."""
        if self.hvp is None:
            raise ValueError(
                "this point was evaluated without its curvature (no Hessian products here)"
            )
        g = self.g
        return PointHessian(self.hvp, g.numel(), g.dtype, g.device)

    def release(self) -> None:
        """Let the curvature's graph go (no more products at this point)."""
        self.hvp = None
