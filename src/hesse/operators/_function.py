"""The Hessian of a function of one tensor at a point, as an operator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hesse._core import check_scalar
from hesse.func._engine import flat_graph_hvp
from hesse.func._tensor import _check_point, _scalar_fn
from hesse.operators._base import CurvatureOperator


class PointHessian(CurvatureOperator):
    """The Hessian at one point as an operator, over the point's products ``hvp(V)``
    (``V`` flat, ``(n,)`` or ``(n, k)``, the result shaped alike): the one "Hessian at a
    point" of hesse, for :class:`FunctionHessian`, ``hesse.minimize``'s points and the
    optimizers' evaluations (:class:`hesse.solvers.Point`).

    Example:
        >>> H = PointHessian(lambda V: 2 * V, 3, torch.float32, torch.device("cpu"))
        >>> (H @ torch.ones(3)).tolist()
        [2.0, 2.0, 2.0]
    """

    def __init__(self, hvp: Callable[[Tensor], Tensor], n: int, dtype, device):
        super().__init__(n, dtype, device)
        self._hvp = hvp

    def _matmat(self, V: Tensor) -> Tensor:
        return self._hvp(V[:, 0]).unsqueeze(1) if V.shape[1] == 1 else self._hvp(V)


class FunctionHessian(PointHessian):
    r""":math:`\nabla^2 f(x)` for ``f: Tensor -> scalar`` at ``x``, on flat vectors of
    length ``x.numel()``. The gradient's graph is built once, at construction; each product
    is one backward pass through it (all columns of a block in one batched pass).

    Example:
        >>> H = FunctionHessian(lambda x: (x**2).sum() + x[0] * x[1], torch.zeros(2))
        >>> H.to_dense()
        tensor([[2., 1.],
                [1., 2.]])
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor):
        x = _check_point(x)
        self.x = x.detach()
        shape = x.shape
        scalar = _scalar_fn(f)  # checked, in the second-order context
        with torch.enable_grad():
            xl = self.x.reshape(-1).clone().requires_grad_()
            value = scalar(xl.reshape(shape))
            g = torch.zeros_like(xl)
            if value.requires_grad:  # else f does not depend on x here: H = 0
                (got,) = torch.autograd.grad(value, xl, create_graph=True, allow_unused=True)
                g = g if got is None else got

        def hvp(V: Tensor) -> Tensor:
            return flat_graph_hvp(g, xl, V)

        super().__init__(hvp, x.numel(), x.dtype, x.device)


def gradient(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), grad f(x))`` by autograd, ``x`` untouched."""
    with torch.enable_grad():
        xl = x.detach().requires_grad_()
        value = check_scalar(f(xl), "f(x)")
        (g,) = torch.autograd.grad(value, xl, allow_unused=True)
    return value.detach(), torch.zeros_like(x) if g is None else g
