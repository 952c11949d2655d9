r"""The pieces of subsampled Newton that its two front ends share
(:class:`hesse.optim.SubsampledNewton` on a model, ``hesse.minimize(...,
method="subsampled-newton")`` on a :class:`hesse.FiniteSum`): which samples form the
curvature, the damped direction from a dense subsampled curvature, and the reduction ratio
that adapts the damping.

The subsample's *size* is :func:`hesse.solvers.subsample_size`; the damping's update is
:func:`hesse.solvers.lm_damping`; the line search is :func:`hesse.solvers.armijo` with
:data:`ARMIJO_C1`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hesse._core._checks import derive_seed
from hesse.solvers._newton import damped_newton_step

#: The sufficient-decrease constant of the backtracking search along a subsampled Newton
#: step (stricter than the usual 1e-4: a step from a rough curvature must earn its keep).
ARMIJO_C1 = 1e-2


def subsample_indices(n: int, k: int, seed: int, step: int = 0) -> Tensor:
    """``k`` positions among ``n`` samples for iteration ``step``, on the CPU, drawn from a
    generator seeded with ``derive_seed(seed, "subsample", step)`` (the one rule for
    derived seeds, :func:`hesse._core._checks.derive_seed`; one derivation for every front
    end, so that ``minimize`` and ``hesse.optim`` draw the same subsamples): with
    replacement and sorted (for locality) when ``k <= n / 4`` (a permutation of all ``n``
    positions would cost more than the curvature), else the first ``k`` of a permutation.

    Example:
        >>> subsample_indices(100, 3, seed=0).tolist()
        [38, 62, 85]
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "subsample", step))
    if k * 4 <= n:
        return torch.randint(n, (k,), generator=gen).sort().values
    return torch.randperm(n, generator=gen)[:k]


#: The smallest subsample a fraction gives the dense curvature, in samples per unknown: a
#: subsampled GGN of a generalised linear model has rank at most the subsample's size, and
#: with fewer than a few samples per unknown the damped solve crawls (logistic regression,
#: P = 101, n = 2000: 14 iterations from 200 samples, 7 from 404).
DENSE_SAMPLES_PER_UNKNOWN = 4


def dense_subsample_count(fraction_or_count: int | float, n: int, P: int) -> int:
    """The samples of a dense subsampled curvature at the start: an int is the count as
    given; a fraction of the ``n`` samples is raised to at least
    :data:`DENSE_SAMPLES_PER_UNKNOWN` per unknown (``P``), or all ``n``.

    Example:
        >>> dense_subsample_count(0.1, 400, 101), dense_subsample_count(0.1, 20000, 101)
        (400, 2000)
        >>> dense_subsample_count(40, 400, 101)
        40
    """
    if isinstance(fraction_or_count, int):
        return min(fraction_or_count, n)
    k = max(1, round(fraction_or_count * n))
    return min(n, max(k, DENSE_SAMPLES_PER_UNKNOWN * P))


def dense_newton_direction(H: Tensor, g: Tensor, damping: float) -> tuple[Tensor, float]:
    r"""The damped Newton direction :math:`d = -(H + \mu I)^{-1} g` of a dense subsampled
    curvature :math:`H`, and the undamped model's value :math:`q = g^\top d + \tfrac12
    d^\top H d` there.

    :math:`\mu = \max(\lambda, \sqrt{\epsilon}\max_i |H_{ii}|)`: an exact solve needs no
    damping for conditioning, only against a singular or badly sampled :math:`H`; the floor
    keeps the null space of a rank-deficient one (where :math:`g` has only rounding noise)
    from a huge step. An indefinite :math:`H + \mu I` (an exact Hessian away from a
    minimum) gets the eigenvalue-modified direction of
    :func:`hesse.solvers.damped_newton_step`.

    Example:
        >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> d, q = dense_newton_direction(H, torch.tensor([2.0, 4.0], dtype=torch.float64), 0.0)
        >>> d.round(decimals=6).tolist(), round(q, 6)
        ([-1.0, -1.0], -3.0)
    """
    floor = torch.finfo(H.dtype).eps ** 0.5 * float(H.diagonal().abs().max())
    d = damped_newton_step(H, g, max(damping, floor)).direction
    q = float(g @ d) + 0.5 * float(d @ (H @ d))
    return d, q


def reduction_ratio(f0: float, f1: float, alpha: float, slope: float, q: float) -> float:
    r"""Actual over predicted reduction of the undamped quadratic model along
    :math:`\alpha d`: :math:`m(\alpha) = \alpha\, g^\top d + \alpha^2 d^\top C d / 2` with
    :math:`d^\top C d = 2 (q - g^\top d)`; :math:`-\infty` where the model predicts no
    decrease.

    Example:
        >>> reduction_ratio(1.0, 0.5, 1.0, -1.0, -0.5)
        1.0
    """
    pred = alpha * slope + alpha * alpha * (q - slope)
    return (f1 - f0) / pred if pred < 0 else -math.inf
