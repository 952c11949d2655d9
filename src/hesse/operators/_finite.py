"""Curvature by finite differences of gradients, for models without second derivatives."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad

from hesse.func._model import Batch
from hesse.func._tensor import fd_scale
from hesse.operators._model import BatchProduct, Columns, ModelCurvature


class FiniteDifferenceHessian(ModelCurvature):
    r"""The Hessian by central differences of gradients, for models whose operations have
    no second derivative in autograd (fused attention kernels, custom ops).

    .. math:: H v \approx \frac{\nabla L(\theta + h v) - \nabla L(\theta - h v)}{2 h},
              \qquad h = \epsilon^{1/3} (1 + \|\theta\|) / \|v\|

    Two gradients per column; accurate to about :math:`\epsilon^{2/3}` relative (1e-5 in
    float32, 1e-10 in float64). Not exactly linear or symmetric, as any difference quotient.
    Arguments as :class:`HessianOperator`, plus ``h`` to fix a relative step.
    """

    def __init__(self, model, loss_fn, data, params=None, *, h: float | None = None):
        super().__init__(model, loss_fn, data, params)
        if h is not None and not h > 0:
            raise ValueError(f"h must be a positive relative step, got {h!r}")
        self.h = h

    def _steps(self, params: Columns, cols: Columns) -> Tensor:
        theta_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p) for p in params])
        )
        k = cols[0].shape[0]
        v_norms = torch.linalg.vector_norm(torch.cat([c.reshape(k, -1) for c in cols], 1), dim=1)
        base = (
            fd_scale(theta_norm, 1.0, self.dtype)
            if self.h is None
            else self.h * (1.0 + float(theta_norm))
        )
        return base / v_norms.clamp_min(torch.finfo(self.dtype).tiny)

    def _batch_product(
        self, params: Columns, batch: Batch, index: int, reuse: bool
    ) -> BatchProduct:
        g = grad(lambda ps: self.fn.loss(ps, batch))

        def product(cols: Columns) -> Columns:
            steps = self._steps(params, cols)
            outs = []
            for j, h in enumerate(steps.tolist()):
                plus = g(tuple(p + h * c[j] for p, c in zip(params, cols)))
                minus = g(tuple(p - h * c[j] for p, c in zip(params, cols)))
                outs.append([(a - b) / (2.0 * h) for a, b in zip(plus, minus)])
            return tuple(torch.stack(t) for t in zip(*outs))

        return product
