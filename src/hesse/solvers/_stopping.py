"""Stopping tests and their defaults, which adapt to the floating point type."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerances:
    r"""When a run has converged.

    Attributes:
        gtol: stop when :math:`\|\nabla f\| \le` ``gtol`` (in the norm ``norm``).
        grad_rtol: or when :math:`\|\nabla f\| \le` ``grad_rtol`` :math:`\|\nabla f(x_0)\|`.
        ftol: or when an iteration changes :math:`f` by at most
            ``ftol`` :math:`\max(|f|, 1)`: nothing more can be gained at this precision.
        xtol: or when a step has :math:`\|s\| \le` ``xtol`` :math:`(1 + \|x\|)`.
        norm: ``inf`` (scipy's choice) or ``2``.
    """

    gtol: float
    grad_rtol: float = 0.0
    ftol: float = 0.0
    xtol: float = 0.0
    norm: float = math.inf

    def gradient_small(self, g_norm: float, g0_norm: float) -> bool:
        return g_norm <= max(self.gtol, self.grad_rtol * g0_norm)


def default_tolerances(dtype: torch.dtype) -> Tolerances:
    r"""Defaults for ``dtype``: ``gtol`` :math:`= \epsilon^{1/3}` (6e-6 in float64, close
    to scipy's 1e-5; 5e-3 in float32, where rounding in the gradient of a function of size
    one is about 1e-6 times its terms), ``ftol = xtol = 10 eps``.

    Example:
        >>> default_tolerances(torch.float64).gtol < 1e-5 < default_tolerances(torch.float32).gtol
        True
    """
    eps = torch.finfo(dtype).eps
    return Tolerances(gtol=eps ** (1.0 / 3.0), ftol=10.0 * eps, xtol=10.0 * eps)


def forcing_rtol(g_norm: float) -> float:
    r"""The relative residual to which truncated Newton solves :math:`H p = -g`:
    :math:`\eta = \min(0.5, \sqrt{\|g\|})` (N&W eq. 7.3 with :math:`\eta_k`), which gives
    superlinear convergence near a solution without over-solving far from it."""
    return min(0.5, math.sqrt(g_norm))
