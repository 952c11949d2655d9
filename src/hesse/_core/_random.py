"""Random probes: the one Rademacher draw that every randomised routine uses.

:mod:`hesse.linalg`'s trace, diagonal and density estimators and :mod:`hesse.solvers`'
one-probe Hutchinson diagonal (AdaHessian, Sophia, the Hessian-free preconditioner) all
draw their signs here, so that a change to the draw (and to the stream a seed gives) is
made once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def rademacher(
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
) -> Tensor:
    r"""A tensor of ``shape`` whose entries are independent random signs,
    :math:`\pm 1` with probability :math:`\tfrac12` each, drawn from ``generator``.

    One call to ``torch.randint(0, 2, ...)`` in ``dtype`` itself, mapped to
    :math:`\{-1, 1\}` in place: no integer tensor and conversion (3x faster on CPU). On
    CPU the entries are drawn one after another in row-major order, so an ``(k, n)`` draw
    gives the same rows as ``k`` draws of shape ``(n,)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = rademacher((2, 3), dtype=torch.float64, device="cpu", generator=g)
        >>> sorted(set(z.flatten().tolist())) in ([-1.0], [1.0], [-1.0, 1.0])
        True
    """
    z = torch.randint(0, 2, tuple(shape), generator=generator, dtype=dtype, device=device)
    return z.mul_(2).sub_(1)
