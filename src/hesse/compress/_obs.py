r"""The mathematics of pruning with a quadratic model, on matrices.

For a weight vector :math:`w` and the quadratic model :math:`\frac12 \delta^\top H \delta`
of the loss increase, removing weight :math:`q` and re-fitting the others optimally
(Optimal Brain Surgeon; Hassibi & Stork, 1993) costs and moves

.. math::
    \Delta L_q = \frac{w_q^2}{2 [H^{-1}]_{qq}}, \qquad
    \delta = -\frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q,

after which the inverse of the Hessian restricted to the remaining weights is
:math:`H^{-1} - H^{-1} e_q e_q^\top H^{-1} / [H^{-1}]_{qq}` (row and column :math:`q`
become zero). :func:`greedy_obs` repeats this, one weight at a time, for a batch of
independent problems: the rows of a layer (ExactOBS, Frantar et al. 2022: a row of
:math:`W` meets the same :math:`H = \frac{2}{N} X X^\top`) or one vector over all
layers (global OBS). :func:`sparsegpt` is the approximate, blocked version of Frantar &
Alistarh (2023).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hesse.compress._mask import count, nm_mask, smallest

#: Most entries of the per-row inverses ExactOBS holds at once (rows x inputs^2).
ROW_CHUNK_ENTRIES = 1 << 24


def damped(H: Tensor, damping: float) -> Tensor:
    r""":math:`H + \lambda I` with :math:`\lambda` = ``damping`` times the mean of the
    diagonal of :math:`H` (relative damping, as in OBC and SparseGPT; ``damping`` itself
    if that mean is zero)."""
    if damping == 0:
        return H
    lam = damping * float(H.diagonal().mean())
    lam = lam if lam > 0 else damping
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def inverse(H: Tensor, what: str) -> Tensor:
    """The inverse of a symmetric positive definite matrix by Cholesky, or a clear error."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(
            f"{what} is not positive definite (its Cholesky factorisation failed at column "
            f"{int(info)}): raise damping, or calibrate on more data"
        )
    return torch.cholesky_inverse(L)


def greedy_obs(
    W: Tensor, Hinv: Tensor, groups: Tensor, quota: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Greedy Optimal Brain Surgeon on a batch of independent problems.

    Problem ``b`` prunes the vector ``W[b]`` under the quadratic model whose inverse
    Hessian is ``Hinv[b]``, removing at each step the allowed weight of least cost
    :math:`w_q^2 / (2 [H^{-1}]_{qq})` and updating the others optimally, until every group
    has lost its quota: weight ``j`` belongs to group ``groups[j]``, and problem ``b`` removes
    ``quota[b, g]`` weights of group ``g`` (every problem removes the same total).

    Args:
        W: ``(B, d)``, not modified.
        Hinv: ``(B, d, d)`` or ``(d, d)`` (shared), not modified.
        groups: ``(d,)`` integers in ``[0, G)``.
        quota: ``(B, G)`` integers.

    Returns:
        ``(W, mask, cost)``: the pruned and updated weights, the mask of kept weights and
        the cost of each removal (zero for kept weights), all ``(B, d)``. ``cost.sum()``
        is the increase of the quadratic model, :math:`\frac12 \delta^\top H \delta`.
    """
    B, d = W.shape
    W = W.clone()
    Hinv = (Hinv.expand(B, d, d) if Hinv.dim() == 2 else Hinv).clone()
    left = quota.clone()
    steps = int(quota[0].sum()) if B else 0
    removed = torch.zeros(B, d, dtype=torch.bool, device=W.device)
    cost = torch.zeros_like(W)
    rows = torch.arange(B, device=W.device)
    tiny = torch.finfo(W.dtype).tiny
    inf = torch.tensor(math.inf, dtype=W.dtype, device=W.device)
    for _ in range(steps):
        diag = Hinv.diagonal(dim1=1, dim2=2).clamp_min(tiny)
        allowed = ~removed & (left[:, groups] > 0)
        score = torch.where(allowed, W * W / diag, inf)
        q = score.argmin(1)
        cost[rows, q] = score[rows, q] / 2
        h = Hinv[rows, :, q]  # column q of each inverse, (B, d)
        hq = h[rows, q]
        W.sub_(h * (W[rows, q] / hq)[:, None])
        W[rows, q] = 0  # exactly, not up to rounding
        Hinv.baddbmm_(h.unsqueeze(2), (h / hq[:, None]).unsqueeze(1), alpha=-1)
        removed[rows, q] = True
        left[rows, groups[q]] -= 1
    # a removed weight's row and column of the inverse are zero, up to rounding: later
    # updates leave it at zero, up to rounding
    return W.masked_fill_(removed, 0.0), ~removed, cost


def exact_obs(
    W: Tensor, Hinv: Tensor, sparsity: float, nm: tuple[int, int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """ExactOBS (OBC) on a layer: :func:`greedy_obs` on each row of ``W`` (rows in chunks
    that bound memory), the same number ``round(sparsity * inputs)`` of weights removed
    from every row, or ``M - N`` from every group of ``M`` with a pattern."""
    rows, d = W.shape
    if nm is None:
        groups = torch.zeros(d, dtype=torch.long, device=W.device)
        quota = torch.full((rows, 1), count(sparsity, d), dtype=torch.long, device=W.device)
    else:
        n, m = nm
        groups = torch.arange(d, device=W.device) // m
        quota = torch.full((rows, d // m), m - n, dtype=torch.long, device=W.device)
    chunk = max(1, ROW_CHUNK_ENTRIES // max(d * d, 1))
    parts = [
        greedy_obs(W[i : i + chunk], Hinv, groups, quota[i : i + chunk])
        for i in range(0, rows, chunk)
    ]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def sparsegpt(
    W: Tensor, Hinv: Tensor, sparsity: float, nm: tuple[int, int] | None, blocksize: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    r"""SparseGPT (Frantar & Alistarh, 2023): approximate OBS that prunes the columns of a
    layer in order, left to right.

    Column :math:`i`'s weights are removed or kept, and the error of each row is
    compensated on the columns to its right only; the inverse Hessians of these trailing
    columns are the rows of the upper Cholesky factor :math:`U` of :math:`H^{-1}`
    (:math:`H^{-1} = U^\top U`), so the whole layer costs one factorisation, and the
    updates are applied lazily, a block of ``blocksize`` columns at a time. The mask is
    chosen per block (the weights of least :math:`w^2 / U_{ii}^2` in the block, over all
    rows, so that the layer's count is ``round(sparsity * size)``), or per group of
    ``M`` columns with a pattern, just before the group is reached.

    Returns:
        ``(W, mask, cost)`` as :func:`exact_obs`; ``cost.sum()`` is
        :math:`\frac12 \operatorname{tr}(\Delta H \Delta^\top)` for the change
        :math:`\Delta` of the weights, with the Hessian whose inverse is ``Hinv``.
    """
    rows, cols = W.shape
    U = torch.linalg.cholesky(Hinv, upper=True)
    W = W.clone()
    mask = torch.ones_like(W, dtype=torch.bool)
    cost = torch.zeros_like(W)
    if nm is not None:  # the groups of a pattern must not straddle two blocks
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        if nm is None:  # this block's share of the layer's count
            k = count(sparsity, rows * i2) - count(sparsity, rows * i1)
            mask1 = smallest(W1 * W1 / (d * d), k)
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = i + nm[1]
                mask1[:, i:j] = nm_mask(W1[:, i:j] ** 2 / d[i:j] ** 2, nm)
            w = W1[:, i]
            e = torch.where(mask1[:, i], 0.0, w) / d[i]
            cost[:, i1 + i] = e * e / 2
            W1[:, i:].sub_(e[:, None] * U1[i, i:][None, :])
            W1[:, i] = torch.where(mask1[:, i], W1[:, i], 0.0)  # exactly zero
            err[:, i] = e
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:].sub_(err @ U[i1:i2, i2:])
    return W, mask, cost
