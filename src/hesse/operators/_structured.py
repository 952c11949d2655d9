"""Structured operators: diagonal and low-rank (eigen or Nyström) approximations."""

from __future__ import annotations

from torch import Tensor

from hesse._core import check_finite
from hesse.operators._base import CurvatureOperator


class DiagonalOperator(CurvatureOperator):
    """``diag(d)`` for a vector ``d`` of length ``P`` (e.g. a Hutchinson diagonal)."""

    def __init__(self, diag: Tensor):
        if not isinstance(diag, Tensor) or diag.dim() != 1 or not diag.is_floating_point():
            raise ValueError("diag must be a 1-d floating point tensor")
        check_finite(diag, "diag")
        super().__init__(diag.shape[0], diag.dtype, diag.device)
        self.diag = diag
        self.psd = bool((diag >= 0).all())
        self.chunk_size = max(diag.shape[0], 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diag[:, None] * V


class LowRankOperator(CurvatureOperator):
    r"""A symmetric low-rank operator :math:`U \operatorname{diag}(s) U^\top`.

    Args:
        U: ``(P, r)`` with orthonormal columns (eigenvectors).
        s: ``(r,)`` eigenvalues.
    """

    def __init__(self, U: Tensor, s: Tensor):
        if U.dim() != 2 or s.shape != (U.shape[1],):
            raise ValueError(
                f"U must be (P, r) and s (r,), got {tuple(U.shape)} and {tuple(s.shape)}"
            )
        check_finite(U, "U")
        check_finite(s, "s")
        super().__init__(U.shape[0], U.dtype, U.device)
        self.U, self.s = U, s.to(U.dtype)
        self.psd = bool((s >= 0).all())
        self.chunk_size = max(U.shape[0], 1)

    @property
    def rank(self) -> int:
        return self.s.numel()

    def _matmat(self, V: Tensor) -> Tensor:
        return self.U @ (self.s[:, None] * (self.U.T @ V))

    def damped_inverse(self, damping: float) -> CurvatureOperator:
        r""":math:`(U \operatorname{diag}(s) U^\top + \lambda I)^{-1}
        = U \operatorname{diag}(1/(s+\lambda)) U^\top + \lambda^{-1}(I - U U^\top)`."""
        if not damping > 0 or bool(((self.s + damping) <= 0).any()):
            raise ValueError(f"damping must be positive and make s + damping > 0, got {damping}")
        return _LowRankPlusIdentity(self.U, 1.0 / (self.s + damping) - 1.0 / damping, 1.0 / damping)


class _LowRankPlusIdentity(CurvatureOperator):
    def __init__(self, U: Tensor, s: Tensor, c: float):
        super().__init__(U.shape[0], U.dtype, U.device)
        self.U, self.s, self.c = U, s, c
        self.psd = True
        self.chunk_size = max(U.shape[0], 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.c * V + self.U @ (self.s[:, None] * (self.U.T @ V))
