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

import itertools
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
    W: Tensor, Hinv: Tensor, groups: Tensor, quota: Tensor, trace: bool = False
) -> tuple[Tensor, ...]:
    r"""Greedy Optimal Brain Surgeon on a batch of independent problems.

    Problem ``b`` prunes the vector ``W[b]`` under the quadratic model whose inverse
    Hessian is ``Hinv[b]``, removing at each step the allowed weight of least cost
    :math:`w_q^2 / (2 [H^{-1}]_{qq})` and updating the others optimally, until every group
    has lost its quota: weight ``j`` belongs to group ``groups[j]``, and problem ``b`` removes
    ``quota[b, g]`` weights of group ``g`` (the problems' totals may differ: a problem that
    is done stays as it is while the others go on).

    Args:
        W: ``(B, d)``, not modified.
        Hinv: ``(B, d, d)`` or ``(d, d)`` (shared), not modified.
        groups: ``(d,)`` integers in ``[0, G)``.
        quota: ``(B, G)`` integers.
        trace: also return the cost of each step, in the order of the steps.

    Returns:
        ``(W, mask, cost)``: the pruned and updated weights, the mask of kept weights and
        the cost of each removal (zero for kept weights), all ``(B, d)``. ``cost.sum()``
        is the increase of the quadratic model, :math:`\frac12 \delta^\top H \delta`.
        With ``trace``, also ``(B, steps)``: the cost of each problem's ``s``-th removal
        (zero after its last).
    """
    B, d = W.shape
    W = W.clone()
    Hinv = (Hinv.expand(B, d, d) if Hinv.dim() == 2 else Hinv).clone()
    left = quota.clone()
    steps = int(quota.sum(1).max()) if B else 0
    removed = torch.zeros(B, d, dtype=torch.bool, device=W.device)
    cost = torch.zeros_like(W)
    costs = torch.zeros(B, steps, dtype=W.dtype, device=W.device)
    rows = torch.arange(B, device=W.device)
    tiny = torch.finfo(W.dtype).tiny
    inf = torch.tensor(math.inf, dtype=W.dtype, device=W.device)
    for step in range(steps):
        active = left.sum(1) > 0
        diag = Hinv.diagonal(dim1=1, dim2=2).clamp_min(tiny)
        allowed = ~removed & (left[:, groups] > 0)
        score = torch.where(allowed, W * W / diag, inf)
        q = score.argmin(1)
        c = torch.where(active, score[rows, q] / 2, 0.0)
        costs[:, step] = c
        cost[rows, q] += c
        # a problem that is done moves nothing: its column is replaced by zeros
        h = Hinv[rows, :, q] * active[:, None]  # column q of each inverse, (B, d)
        hq = torch.where(active, h[rows, q], 1.0)
        W.sub_(h * (W[rows, q] / hq)[:, None])
        W[rows, q] = torch.where(active, 0.0, W[rows, q])  # exactly, not up to rounding
        Hinv.baddbmm_(h.unsqueeze(2), (h / hq[:, None]).unsqueeze(1), alpha=-1)
        removed[rows, q] |= active
        left[rows, groups[q]] -= active.long()
    # a removed weight's row and column of the inverse are zero, up to rounding: later
    # updates leave it at zero, up to rounding
    out = (W.masked_fill_(removed, 0.0), ~removed, cost)
    return (*out, costs) if trace else out


#: The most entries (rows x (k + 1) x (inputs + 1)) of the exact allocation's dynamic
#: programme (its choices, rows x (k + 1), at most a sixteenth); beyond, :func:`allocate`
#: prices the removals on convex hulls.
ALLOCATE_MAX_ENTRIES = 1 << 28


def allocate(F: Tensor, k: int) -> Tensor:
    r"""How many weights each row loses so that the rows lose ``k`` in all at least cost.

    ``F[r, c]`` is the cost of the first ``c`` greedy removals of row ``r`` (``F[:, 0] =
    0``); the counts minimise :math:`\sum_r F_r(c_r)` subject to :math:`\sum_r c_r = k`.
    Exactly, by dynamic programming over the rows (:math:`O(\text{rows} \cdot k \cdot
    \text{inputs})`), up to :data:`ALLOCATE_MAX_ENTRIES`; beyond it by :func:`_hull_prices`.
    OBC (Frantar et al. 2022) sorts the raw step costs instead, which assumes each row's
    costs rise (a row whose cheap removals come after an expensive one is misjudged).
    """
    rows, d1 = F.shape
    if rows * (k + 1) * d1 > ALLOCATE_MAX_ENTRIES or rows * (k + 1) > ALLOCATE_MAX_ENTRIES >> 4:
        return _hull_prices(F, k)
    F64 = F.detach().double().cpu()
    inf = torch.full((d1 - 1,), math.inf, dtype=torch.float64)
    best = torch.full((k + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[j]: the least cost of j removals from the rows so far
    choice = torch.zeros(rows, k + 1, dtype=torch.int32)
    for r in range(rows):
        # only the totals the rows so far can reach and the rows left can complete
        lo, hi = max(0, k - (rows - 1 - r) * (d1 - 1)), min(k, (r + 1) * (d1 - 1))
        # windows[j, i] = best[j + i - (d1 - 1)]: row r loses c = d1 - 1 - i of the j
        windows = torch.cat([inf, best]).unfold(0, d1, 1)[lo : hi + 1]
        total, i = (windows + F64[r].flip(0)).min(1)
        best = torch.full_like(best, math.inf)
        best[lo : hi + 1] = total
        choice[r, lo : hi + 1] = d1 - 1 - i
    counts = torch.empty(rows, dtype=torch.long)
    j = k
    for r in reversed(range(rows)):
        counts[r] = choice[r, j]
        j -= int(counts[r])
    return counts.to(F.device)


def _hull_prices(F: Tensor, k: int) -> Tensor:
    r"""The Lagrangian allocation: each row's cumulative cost replaced by its lower convex
    hull, its removals priced at the slope of the hull's segment they fall in, and the
    ``k`` cheapest prices over all rows taken (the slopes rise along a row, so they are
    the first removals of each row). Optimal when every count lands on a vertex of its
    row's hull (for a multiplier :math:`\mu` every row then minimises :math:`F_r(c) - \mu
    c` on its own); the count of a row cut inside a segment can cost more."""
    rows, d1 = F.shape
    price = torch.empty(rows, d1 - 1, dtype=torch.float64)
    for r, f in enumerate(F.detach().double().cpu().tolist()):
        hull = [0]  # indices of the lower convex hull of the points (c, f[c])
        for c in range(1, d1):
            # drop the last vertex while it lies on or above the segment to c
            while len(hull) > 1 and (f[hull[-1]] - f[hull[-2]]) * (c - hull[-2]) >= (
                f[c] - f[hull[-2]]
            ) * (hull[-1] - hull[-2]):
                hull.pop()
            hull.append(c)
        for a, b in itertools.pairwise(hull):
            price[r, a:b] = (f[b] - f[a]) / (b - a)
    counts = torch.zeros(rows, dtype=torch.long)
    if k > 0:
        chosen = torch.topk(price.reshape(-1), k, largest=False).indices
        counts = torch.bincount(chosen // (d1 - 1), minlength=rows)
    return counts.to(F.device)


def exact_obs(
    W: Tensor,
    Hinv: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    allocation: str = "layer",
) -> tuple[Tensor, Tensor, Tensor]:
    """ExactOBS (OBC) on a layer: :func:`greedy_obs` on each row of ``W`` (rows in chunks
    that bound memory).

    ``allocation="layer"`` (OBC): every row is pruned to the end once, recording the cost
    of each of its removals, :func:`allocate` spreads the layer's ``round(sparsity *
    size)`` removals over the rows at least total cost, and each row is pruned again to
    its own count (about twice the work of ``"row"``). ``"row"``: the same number
    ``round(sparsity * inputs)`` from every row. With a pattern, ``M - N`` from every
    group of ``M``."""
    rows, d = W.shape
    if nm is None:
        groups = torch.zeros(d, dtype=torch.long, device=W.device)
        per_row = d if allocation == "layer" else count(sparsity, d)
        quota = torch.full((rows, 1), per_row, dtype=torch.long, device=W.device)
    else:
        n, m = nm
        groups = torch.arange(d, device=W.device) // m
        quota = torch.full((rows, d // m), m - n, dtype=torch.long, device=W.device)
    chunk = max(1, ROW_CHUNK_ENTRIES // max(d * d, 1))

    def run(quota: Tensor, trace: bool = False) -> list[tuple[Tensor, ...]]:
        return [
            greedy_obs(W[i : i + chunk], Hinv, groups, quota[i : i + chunk], trace)
            for i in range(0, rows, chunk)
        ]

    k = count(sparsity, rows * d)
    if nm is None and allocation == "layer" and k == 0:
        quota = torch.zeros_like(quota)
    elif nm is None and allocation == "layer":
        steps = torch.cat([p[3] for p in run(quota, trace=True)])
        F = torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(1)], 1)
        counts = allocate(F, k)
        # (beyond the exact programme's size) never above the same count in every row
        u = count(sparsity, d)
        if u * rows == k and float(F[:, u].sum()) < float(F.gather(1, counts[:, None]).sum()):
            counts = torch.full_like(counts, u)
        quota = counts[:, None]
    return tuple(torch.cat(p) for p in zip(*run(quota)))  # type: ignore[return-value]


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
