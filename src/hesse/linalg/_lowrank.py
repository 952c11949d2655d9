"""Low-rank approximations built from products, and an inverse operator that solves by CG."""

from __future__ import annotations

import torch
from torch import Tensor

from hesse.linalg._common import (
    as_operator,
    check_choice,
    check_positive_int,
    gaussian,
    make_generator,
    promote,
)
from hesse.linalg._eigen import lanczos
from hesse.linalg._solve import SolveResult, cg, check_inverse_solve
from hesse.operators import CurvatureOperator, LowRankOperator


class ConvergenceWarning(RuntimeWarning):
    """An iterative solve inside an operator product did not converge."""


def low_rank(
    A: object,
    rank: int,
    method: str = "eigen",
    *,
    tol: float = 1e-3,
    oversample: int = 10,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> LowRankOperator:
    r"""A rank-``rank`` approximation of a symmetric operator as a :class:`LowRankOperator`.

    ``method="eigen"``: the ``rank`` eigenpairs of largest magnitude by :func:`lanczos`
    (the best rank-r approximation when they converge). ``method="nystrom"``: the
    randomised Nyström approximation :math:`A\Omega(\Omega^\top A\Omega)^{+}\Omega^\top A`
    of a positive semidefinite ``A`` from ``rank + oversample`` products done in one
    batch (Tropp, Yurtsever, Udell, Cevher 2017, stabilised by a shift), truncated to
    ``rank``.

    The result has the operator's dtype, so that it combines with it (``A - low_rank(A,
    r)``); for a float16 or bfloat16 operator only the products run in that dtype, the
    factorisations in float32, and the factors are rounded to it at the end.
    """
    op = as_operator(A)
    rank = check_positive_int(rank, "rank")
    method = check_choice(method, "method", ("eigen", "nystrom"))
    if method == "eigen":
        r = lanczos(
            op,
            k=rank,
            which="magnitude",
            tol=tol,
            seed=seed,
            generator=generator,
            max_iter=min(op.shape[0], max(3 * rank + 20, 30)),
        )
        return _in_dtype(r.eigenvectors, r.eigenvalues, op.dtype)
    if not op.psd:
        raise ValueError(
            "the Nyström approximation needs a positive semidefinite operator (tag psd=True, "
            f"e.g. GGNOperator); {type(op).__name__} is not: use method='eigen'"
        )
    n, dtype, work = op.shape[0], op.dtype, promote(op)
    ell = min(n, rank + check_positive_int(oversample, "oversample", 0))
    gen = make_generator(seed, generator, op.device, op)
    omega = gaussian(n, ell, work.dtype, op.device, gen)
    omega, _ = torch.linalg.qr(omega)
    Y = work @ omega
    nu = torch.finfo(dtype).eps * torch.linalg.matrix_norm(Y)  # the shift: products' eps
    Y_nu = Y + nu * omega
    C = torch.linalg.cholesky(_sym(omega.T @ Y_nu))
    B = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T  # Y_nu C^{-T}
    U, sig, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sig**2 - nu).clamp_min(0)
    return _in_dtype(U[:, :rank], lam[:rank], dtype)


def _in_dtype(U: Tensor, s: Tensor, dtype: torch.dtype) -> LowRankOperator:
    """``U diag(s) Uᵀ`` as an operator of ``dtype`` (a no-op when the factors have it)."""
    return LowRankOperator(U.to(dtype), s.to(dtype))


def _sym(M: Tensor) -> Tensor:
    return (M + M.T) / 2


class InverseOperator(CurvatureOperator):
    r"""The inverse :math:`(A + \lambda I)^{-1}` of a symmetric positive definite operator,
    applied by conjugate gradients (one solve per column).

    ``last_results`` holds the :class:`SolveResult` of each column of the latest product.
    A product cannot return a status, so a solve that does not converge to ``rtol`` in
    ``max_iter`` iterations, or meets negative curvature (the operator is not positive
    definite), raises :class:`hesse.linalg.NotConvergedError` saying what to change (see
    :func:`hesse.linalg._solve.check_inverse_solve`); a non-finite one raises
    :class:`hesse.NonFiniteError`.
    """

    def __init__(
        self,
        A: object,
        damping: float = 0.0,
        *,
        rtol: float = 1e-6,
        max_iter: int | None = None,
        M: object = None,
    ):
        op = as_operator(A, allow_empty=True)
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op.damped(damping) if damping else op
        self.rtol, self.max_iter, self.M = rtol, max_iter, M
        self.psd = op.psd
        self.last_results: list[SolveResult] = []

    def _matmat(self, V: Tensor) -> Tensor:
        self.last_results = [
            cg(self.op, V[:, j].contiguous(), M=self.M, rtol=self.rtol, max_iter=self.max_iter)
            for j in range(V.shape[1])
        ]
        for j, r in enumerate(self.last_results):
            check_inverse_solve(r, V[:, j], self.rtol)
        return torch.stack([r.x for r in self.last_results], dim=1)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        return self.op.synchronize_generator(generator)
