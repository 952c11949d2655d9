r"""The stochastic diagonal of the Hessian that AdaHessian and Sophia both use.

One Rademacher probe :math:`z` gives :math:`z \odot H z`, an unbiased estimate of
:math:`\mathrm{diag}(H)` (Bekas, Kokiopoulou & Saad 2007); the optimizers average it over
steps. (:func:`hesse.linalg.hutchinson_diagonal` is the many-probe estimator on an
operator, with standard errors; this is the one-probe form on a list of parameter
tensors. Both take the probe step from :func:`hesse.linalg._diag.probe_diagonal` and the
signs from :func:`hesse._core._random.rademacher`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hesse._core._checks import check_int
from hesse._core._random import rademacher
from hesse.linalg._diag import probe_diagonal


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Random signs shaped like each tensor (its dtype, its device), drawn from
    ``generator`` in order (:func:`hesse._core._random.rademacher`, one call per tensor).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [z.shape for z in rademacher_like([torch.zeros(2, 3), torch.zeros(4)], g)]
        [torch.Size([2, 3]), torch.Size([4])]
    """
    return [
        rademacher(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in tensors
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
    samples = check_int(samples, "samples")
    if samples == 1:  # the common case: no accumulators
        return probe_diagonal(hvp, rademacher_like(like, generator))
    total = [torch.zeros_like(t) for t in like]
    for _ in range(samples):
        for acc, d in zip(total, probe_diagonal(hvp, rademacher_like(like, generator))):
            acc.add_(d)
    return [t.div_(samples) for t in total]
