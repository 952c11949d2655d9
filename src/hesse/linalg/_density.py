"""Spectral density by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core._checks import check_finite, check_int, check_real
from hesse._core._progress import report
from hesse._core._random import rademacher
from hesse.linalg._common import (
    Result,
    Status,
    advice,
    as_operator,
    make_generator,
    product_dtype,
    promote,
)


@dataclass(frozen=True)
class DensityResult(Result):
    """A spectral density estimate.

    Attributes:
        grid: ``(G,)`` points where the density is evaluated.
        density: ``(G,)`` the smoothed density, normalised so that its integral over the
            grid (trapezoid rule) is one.
        nodes: ``(num_probes, steps)`` Gauss quadrature nodes (Ritz values) per probe.
        weights: ``(num_probes, steps)`` their weights; each row sums to one.
        sigma: the width of the Gaussian kernel that smooths the nodes.
        matvecs: products with the operator (``num_probes * steps``, done in batches).
        status: ``"budget"`` (the estimate of the budget asked for: more probes or steps for
            a finer one), or ``"non_finite"``; ``message`` says which, and what to change.
        dtype: the dtype the products were computed in (the operator's). For float16 and
            bfloat16 the Lanczos recurrences and quadrature run in float32, and ``grid``,
            ``density``, ``nodes`` and ``weights`` are float32.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    matvecs: int
    status: Status
    dtype: torch.dtype

    OK = (Status.BUDGET,)

    @property
    def message(self) -> str:
        if self.success:
            return (
                f"spectral density from {self.nodes.shape[0]} probes of {self.nodes.shape[1]} "
                f"Lanczos steps ({self.matvecs} products), smoothed with sigma {self.sigma:.3g}"
            )
        return (
            f"a product with the operator or a Lanczos step was not finite after "
            f"{self.matvecs} products; {advice(self.status)}"
        )

    def moments(self, power: int) -> float:
        r"""The quadrature estimate of :math:`\frac1P \operatorname{tr}(A^p)`."""
        return float((self.weights * self.nodes**power).sum(1).mean())

    def negative_eigenvalue_share(self) -> float:
        r"""The share of eigenvalues below :math:`-\sigma` (the density's resolution),
        from the quadrature averaged over the probes. A sign closer to zero than
        :math:`\sigma` is not resolved; counting it would count the noise of the cluster
        of eigenvalues near zero."""
        return float((self.weights * (self.nodes < -self.sigma)).sum(1).mean())

    def negative_curvature_share(self) -> float:
        r"""The share of curvature that is negative,
        :math:`\sum_{\lambda_i<0} |\lambda_i| / \sum_i |\lambda_i|`, from the quadrature:
        eigenvalues weighted by their size, so the cluster near zero hardly counts and the
        estimate is stable across probes and steps.

        Example:
            >>> A = torch.diag(torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64))
            >>> r = spectral_density(A, num_probes=4, steps=3, seed=0)
            >>> round(r.negative_curvature_share(), 6)  # exact: 3 steps span the space
            0.25
        """
        absolute = float((self.weights * self.nodes.abs()).sum(1).mean())
        negative = float((self.weights * self.nodes.clamp(max=0).abs()).sum(1).mean())
        return negative / absolute if absolute > 0 else 0.0


def slq_nodes(
    A: object, num_probes: int, steps: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    r"""Lanczos from ``num_probes`` random sign vectors at once (one batched product per
    step, full re-orthogonalisation per probe): the eigenvalues :math:`\theta` of each
    tridiagonal and the squared first components :math:`\tau^2` of its eigenvectors, the
    nodes and weights of the Gauss quadrature of :math:`v^\top f(A) v` (Golub & Meurant).
    Float32 for a float16 or bfloat16 operator (the products run in its dtype)."""
    op = promote(as_operator(A))
    n = op.shape[0]
    steps = min(steps, n)
    report("budget", num_probes * steps)
    V = rademacher((n, num_probes), dtype=op.dtype, device=op.device, generator=generator)
    V = V / math.sqrt(n)
    Q = torch.zeros(num_probes, steps, n, dtype=op.dtype, device=op.device)
    alphas = torch.zeros(num_probes, steps, dtype=op.dtype, device=op.device)
    betas = torch.zeros(num_probes, steps, dtype=op.dtype, device=op.device)
    q = V.T.contiguous()  # (num_probes, n)
    m = steps
    for j in range(steps):
        Q[:, j] = q
        W = (op @ q.T.contiguous()).T  # (num_probes, n)
        alphas[:, j] = (q * W).sum(1)
        for _ in range(2):
            W = W - torch.einsum(
                "bj,bjn->bn", torch.einsum("bjn,bn->bj", Q[:, : j + 1], W), Q[:, : j + 1]
            )
        betas[:, j] = torch.linalg.vector_norm(W, dim=1)
        if j + 1 < steps:
            tiny = torch.finfo(op.dtype).eps * alphas[:, : j + 1].abs().amax(1).clamp_min(1.0)
            if bool((betas[:, j] <= tiny).any()):
                m = j + 1  # an invariant subspace for some probe: stop all there (exact)
                break
            q = W / betas[:, j : j + 1]
    T = torch.diag_embed(alphas[:, :m])
    off = betas[:, : m - 1]
    T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[:, 0, :] ** 2, num_probes * m


_MAX_COUNT = 2**31 - 1  # probes or steps: far beyond any use, and within torch's sizes
_MAX_GRID = 2**26  # evaluation points


def spectral_density(
    A: object,
    *,
    num_probes: int = 10,
    steps: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> DensityResult:
    r"""The spectral density :math:`\phi(t) = \frac1P \sum_i \delta(t - \lambda_i)` of a
    symmetric operator by stochastic Lanczos quadrature (Lin, Saad, Yang 2016; Ghorbani,
    Krishnan, Xiao 2019), smoothed by a Gaussian kernel of width ``sigma``.

    Args:
        A: a symmetric operator or square tensor.
        num_probes: random starts; the density is their average.
        steps: Lanczos steps per probe.
        grid: the evaluation points, or their number (spanning the nodes with a margin;
            at most 2**26).
        sigma: the kernel width; by default 1% of the span of the nodes.
        seed, generator: for the probes.
    """
    op = promote(as_operator(A))
    if not op.symmetric:
        raise ValueError("spectral_density needs a symmetric operator")
    num_probes = check_int(num_probes, "num_probes", 1, _MAX_COUNT)
    steps = check_int(steps, "steps", 1, _MAX_COUNT)
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not grid.is_floating_point():
            raise ValueError(
                f"grid must be a 1-d floating tensor of at least 2 points or their number, got "
                f"a tensor of shape {tuple(grid.shape)} and dtype {grid.dtype}"
            )
        check_finite(grid, "grid")
    else:
        grid = check_int(grid, "grid", 2, _MAX_GRID)
    if sigma is not None:
        sigma = check_real(sigma, "sigma", 0.0, open_lo=True)
    gen = make_generator(seed, generator, op.device, op)
    try:
        nodes, weights, matvecs = slq_nodes(op, num_probes, steps, gen)
    except (RuntimeError, MemoryError) as err:
        if "alloc" not in str(err) and not isinstance(err, MemoryError):
            raise
        m = min(steps, op.shape[0])
        raise MemoryError(
            f"num_probes={num_probes} probes of steps={m} Lanczos vectors of size "
            f"{op.shape[0]} do not fit in memory ({num_probes * m * op.shape[0]} numbers); "
            "ask for fewer"
        ) from err
    if not bool(torch.isfinite(nodes).all()):
        empty = torch.zeros(0, dtype=op.dtype, device=op.device)
        return DensityResult(
            empty, empty, nodes, weights, math.nan, matvecs, Status.NON_FINITE, product_dtype(op)
        )
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    if sigma is None:
        sigma = 0.01 * span
    if isinstance(grid, int):
        grid = torch.linspace(
            lo - 5 * sigma, hi + 5 * sigma, grid, dtype=op.dtype, device=op.device
        )
    # the kernel sum in blocks of grid points, so that memory does not grow with the grid
    block = max(1, 2**22 // nodes.numel())
    norm = sigma * math.sqrt(2 * math.pi)
    density = torch.cat(
        [
            (torch.exp(-0.5 * ((g[:, None, None] - nodes[None]) / sigma) ** 2) * weights[None])
            .sum(-1)
            .mean(-1)
            / norm
            for g in torch.split(grid, block)
        ]
    )
    area = torch.trapezoid(density, grid)
    if float(area) > 0:
        density = density / area
    return DensityResult(
        grid, density, nodes, weights, float(sigma), matvecs, Status.BUDGET, product_dtype(op)
    )
