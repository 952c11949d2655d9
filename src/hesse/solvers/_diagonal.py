r"""The stochastic diagonal of the Hessian that AdaHessian and Sophia both use.

One Rademacher probe :math:`z` gives :math:`z \odot H z`, an unbiased estimate of
:math:`\mathrm{diag}(H)` (Bekas, Kokiopoulou & Saad 2007); the optimizers average it over
steps. (:func:`hesse.linalg.hutchinson_diagonal` is the many-probe estimator on an
operator; this is the one-probe form on a list of parameter tensors.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Random signs shaped like each tensor, drawn from ``generator`` in order."""
    return [
        torch.randint(0, 2, t.shape, generator=generator, device=t.device, dtype=t.dtype)
        .mul_(2)
        .sub_(1)
        for t in tensors
    ]


def hutchinson_diagonal_probe(
    hvp: Callable[[list[Tensor]], Sequence[Tensor]],
    like: Sequence[Tensor],
    generator: torch.Generator,
    samples: int = 1,
) -> list[Tensor]:
    r""":math:`\frac1s \sum_{j=1}^s z_j \odot H z_j` for ``samples`` Rademacher probes,
    one tensor per parameter.

    Example:
        >>> H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> d = hutchinson_diagonal_probe(lambda z: [H @ z[0]], [torch.zeros(2)], g, samples=2000)
        >>> d[0].round(decimals=1)
        tensor([2., 3.])
    """
    if samples == 1:  # the common case: no accumulators
        z = rademacher_like(like, generator)
        return [zi * hz for zi, hz in zip(z, hvp(z))]
    total = [torch.zeros_like(t) for t in like]
    for _ in range(samples):
        z = rademacher_like(like, generator)
        for acc, zi, hz in zip(total, z, hvp(z)):
            acc.add_(zi * hz)
    return [t.div_(samples) for t in total]
