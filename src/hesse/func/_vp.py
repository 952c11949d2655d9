r"""Gauss-Newton- and Fisher-vector products: :math:`J^\top M J v` for an output-space
matrix :math:`M`, with :math:`J` the Jacobian of the outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hesse._core import check_finite
from hesse.func._engine import jmj_product
from hesse.func._output import OutputCurvature, fisher_mm
from hesse.func._tensor import _check_point, as_directions


def ggn_vp(
    output_fn: Callable[[Tensor], Tensor],
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Tensor,
    v: Tensor,
    targets: Any = None,
) -> Tensor:
    r"""Generalised Gauss-Newton-vector product of ``loss_fn(output_fn(x), targets)``.

    .. math:: G v = J^\top \nabla^2_o \ell(o)\, J v,\qquad o = \mathrm{output\_fn}(x)

    Args:
        output_fn: ``x -> outputs``.
        loss_fn: ``(outputs, targets) -> scalar``; closed-form output Hessians for
            ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss``.
        x: the point.
        v: a direction shaped like ``x``, or a batch of them of shape ``(k, *x.shape)``.
        targets: passed to ``loss_fn``.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        >>> ggn_vp(lambda x: A @ x, torch.nn.MSELoss(reduction="sum"), torch.zeros(2),
        ...        torch.tensor([1.0, 0.0]), targets=torch.zeros(2))
        tensor([2., 4.])
    """
    x = _check_point(x)
    V, single = as_directions(x, v)
    curv = OutputCurvature(loss_fn)
    out = jmj_product(
        lambda xs: output_fn(xs[0]), (x,), lambda o: lambda U: curv.hessian_mm(o, targets, U)
    )((V,))[0]
    check_finite(out, "the product (the outputs or the loss are not finite at x?)")
    return out[0] if single else out


def fisher_vp(
    output_fn: Callable[[Tensor], Tensor],
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Tensor,
    v: Tensor,
    targets: Any = None,
    *,
    kind: str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    likelihood: str | None = None,
) -> Tensor:
    r"""Fisher-vector product :math:`J^\top \Phi J v` (see :mod:`hesse.func._output`).

    ``kind="empirical"`` uses the gradients of the loss at the true targets;
    ``kind="mc"`` draws ``mc_samples`` targets per sample from the model's predictive
    distribution (with ``generator``), whose expectation is the GGN. ``likelihood``
    (``"categorical"``, ``"gaussian"``, ``"bernoulli"``) names the likelihood of a loss
    written as a function, which ``kind="mc"`` needs (see
    :class:`~hesse.func.OutputCurvature`).
    """
    x = _check_point(x)
    V, single = as_directions(x, v)
    curv = OutputCurvature(loss_fn, likelihood)
    curv.check_fisher(kind)

    def make_out_mm(o: Tensor) -> Callable[[Tensor], Tensor]:
        S, c = curv.fisher_factors(o, targets, kind, generator, mc_samples)
        return lambda U: fisher_mm(S, c, U)

    out = jmj_product(lambda xs: output_fn(xs[0]), (x,), make_out_mm)((V,))[0]
    check_finite(out, "the product (the outputs or the loss are not finite at x?)")
    return out[0] if single else out
