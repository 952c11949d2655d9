r"""Eigenvalue-corrected KFAC (George et al. 2018): KFAC's eigenbasis with the eigenvalues
refitted to the per-sample gradients (the factors and the layers are
:mod:`hesse.operators._kfac`'s)."""

from __future__ import annotations

import torch
from torch import Tensor

from hesse._core import check_finite
from hesse.operators._base import CurvatureOperator
from hesse.operators._kfac import KFACOperator, _apply, _check_damping, _EigenKronecker


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC (George et al. 2018): KFAC's eigenbasis :math:`Q_G
    \otimes Q_A` per layer, with the eigenvalues refitted to the per-sample gradients,

    .. math:: \Lambda_{ij} = \sum_n \sum_k \big(Q_G^\top \nabla_{\bar W} f_{nk}\,
        Q_A\big)_{ij}^2, \qquad \nabla_{\bar W} f_{nk} = \sum_r g_{nrk} \bar x_{nr}^\top,

    weighted over batches as :math:`G` (per sample in the type-2 / Monte-Carlo sense: one
    gradient per sample and column, as curvlinops). Of all matrices diagonal in that
    eigenbasis it is the closest to the curvature in Frobenius norm. Arguments as
    :class:`KFACOperator`; with ``refit=False`` the eigenvalues are KFAC's (the operator
    equals KFAC) until :meth:`refit`.
    """

    def __init__(self, *args, refit: bool = True, **kwargs):
        self._refit_now = bool(refit)
        super().__init__(*args, **kwargs)

    def update(self) -> None:
        """Compute the factors, their eigenbasis and (unless made with ``refit=False``)
        the refitted eigenvalues again, at the current parameters."""
        super().update()
        for b in self.blocks:
            la, _, lg, _ = b.eigh()
            b.eigenvalues = lg[:, None] * la[None, :]
        if self._refit_now:
            self.refit()

    def refit(self) -> None:
        """Refit the eigenvalues in the current eigenbasis (one pass over the data)."""
        sums, total = self._eigenvalue_sums()
        for b, s in zip(self.blocks, sums):
            b.eigenvalues = s / total if self.reduction == "mean" else s
            check_finite(b.eigenvalues, f"the eigenvalues of layer {b.module!r}")
        self._refit_now = True

    def _eigenvalue_sums(self) -> tuple[list[Tensor], float]:
        """Each layer's (weighted) sum over the data of the squared rotated gradients, and
        the batches' total weight: what the data-parallel operator adds up over ranks."""
        mean = self.reduction == "mean"
        sums = [
            torch.zeros(b.G.shape[0], b.A.shape[0], dtype=self.dtype, device=self.device)
            for b in self.blocks
        ]
        total = 0.0
        for weight, per_layer in self._batches():
            w = weight if mean else 1.0
            for j, (x, g) in enumerate(per_layer):
                _, qa, _, qg = self.blocks[j].eigh()
                sums[j].add_(_rotated_square_sum(x @ qa, g @ qg), alpha=w)
            total += weight
        return sums, total

    def _matmat(self, V: Tensor) -> Tensor:
        def block(j: int, M: Tensor) -> Tensor:
            b = self.blocks[j]
            _, qa, _, qg = b.eigh()
            return qg @ (b.eigenvalues * (qg.T @ M @ qa)) @ qa.T

        return _apply(self, V, block)

    def _spectra(self) -> list[Tensor]:
        return [b.eigenvalues for b in self.blocks]

    def trace(self) -> Tensor:
        """The sum of the eigenvalues."""
        return sum(b.eigenvalues.sum() for b in self.blocks)

    def frobenius_norm(self) -> Tensor:
        """The root of the sum of the squared eigenvalues."""
        return torch.sqrt(sum(b.eigenvalues.square().sum() for b in self.blocks))

    def inverse(self, damping: float, *, method: str = "exact") -> CurvatureOperator:
        r""":math:`(Q \operatorname{diag}(\Lambda) Q^\top + \lambda I)^{-1} = Q
        \operatorname{diag}(1 / (\Lambda + \lambda)) Q^\top` (``method="exact"`` only: the
        refitted eigenvalues are not a Kronecker product to damp factor by factor)."""
        if method != "exact":
            raise ValueError(f"EKFAC's inverse has method='exact' only, got {method!r}")
        damping = _check_damping(damping)
        return _EigenKronecker(self, [1.0 / (b.eigenvalues + damping) for b in self.blocks])


def _rotated_square_sum(xr: Tensor, gr: Tensor) -> Tensor:
    """``sum_{k,n} (sum_r gr[k,n,r,:] xr[n,r,:]^T)^2`` for ``xr (N, R, d)`` and
    ``gr (K, N, R, out)``: without weight sharing, from the squares of the rotated rows
    (no per-sample gradient is formed); with it, one column's per-sample gradients at a
    time."""
    if xr.shape[1] == 1:
        return torch.einsum("kno,nd->od", gr[:, :, 0].square(), xr[:, 0].square())
    total = None
    for gk in gr:
        e = torch.einsum("nro,nrd->nod", gk, xr).square_().sum(0)
        total = e if total is None else total.add_(e)
    return total
