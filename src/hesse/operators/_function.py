"""The Hessian of a function of one tensor at a point, as an operator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hesse._core import check_scalar
from hesse.func._engine import hvp_product
from hesse.func._tensor import _check_point, _scalar_fn
from hesse.operators._base import CurvatureOperator


class FunctionHessian(CurvatureOperator):
    r""":math:`\nabla^2 f(x)` for ``f: Tensor -> scalar`` at ``x``, on flat vectors of
    length ``x.numel()``. The gradient's graph is built once, at construction; each product
    is one backward pass through it.

    Example:
        >>> H = FunctionHessian(lambda x: (x**2).sum() + x[0] * x[1], torch.zeros(2))
        >>> H.to_dense()
        tensor([[2., 1.],
                [1., 2.]])
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor):
        x = _check_point(x)
        super().__init__(x.numel(), x.dtype, x.device)
        self.x = x.detach()
        shape = x.shape

        scalar = _scalar_fn(f)  # checked, in the second-order context

        def loss(xs: tuple[Tensor, ...]) -> Tensor:
            return scalar(xs[0].reshape(shape))

        self._product = hvp_product(loss, (self.x.reshape(-1),), reuse=True)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._product((V.T,))[0].T


def gradient(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), grad f(x))`` by autograd, ``x`` untouched."""
    with torch.enable_grad():
        xl = x.detach().requires_grad_()
        value = check_scalar(f(xl), "f(x)")
        (g,) = torch.autograd.grad(value, xl, allow_unused=True)
    return value.detach(), torch.zeros_like(x) if g is None else g
