r"""Diagonal estimators: exact (``P`` products), Bekas-Kokiopoulou-Saad and XDiag.

Each returns a :class:`DiagonalResult` with the estimate of :math:`\operatorname{diag}(A)`
as a tensor on the operator's device, of its dtype (float32 for a float16 or bfloat16
operator, whose products run in its dtype and the rest in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core import NonFiniteError
from hesse.linalg._common import Result, Status, advice, as_operator, product_dtype, promote
from hesse.linalg._trace import apply, check_budget, leave_one_out_basis, prepare, rank_deficient
from hesse.linalg._trace import signs as sign_probes
from hesse.operators import CurvatureOperator


@dataclass(frozen=True)
class DiagonalResult(Result):
    """The result of a diagonal estimator.

    Attributes:
        estimate: the estimate of :math:`\\operatorname{diag}(A)`, shape ``(P,)``; NaN when
            the status is ``"non_finite"``.
        stderr: per-entry standard errors, shape ``(P,)`` (zeros for an exact diagonal), or
            ``None`` where none is available.
        matvecs: the number of matrix-vector products used.
        method: ``"exact"``, ``"hutchinson"`` or ``"xdiag"``.
        status: ``Status.CONVERGED`` for the exact diagonal, ``Status.BUDGET`` when an
            estimator spent its budget normally, ``Status.NON_FINITE`` when a product or the
            estimate was not finite.
        dtype: the dtype the products were computed in (the operator's); ``estimate`` and
            ``stderr`` are float32 when it is float16 or bfloat16, else of this dtype.
    """

    OK = (Status.BUDGET, Status.CONVERGED)

    estimate: Tensor
    stderr: Tensor | None
    matvecs: int
    method: str
    status: Status
    dtype: torch.dtype

    @property
    def message(self) -> str:
        if self.success:
            return f"{self.method} diagonal from {self.matvecs} products"
        return (
            f"{self.method} diagonal: a product with the operator or the estimate was not "
            f"finite after {self.matvecs} products; {advice(self.status)}"
        )


def _finish(
    op: CurvatureOperator,
    method: str,
    estimate: Tensor | None,
    stderr: Tensor | None,
    matvecs: int,
    status: Status = Status.BUDGET,
) -> DiagonalResult:
    """The result, with status ``NON_FINITE`` (and NaN) if anything is missing or not finite."""
    parts = [t for t in (estimate, stderr) if t is not None]
    if estimate is None or not all(bool(torch.isfinite(t).all()) for t in parts):
        nan = torch.full((op.shape[0],), math.nan, dtype=op.dtype, device=op.device)
        return DiagonalResult(nan, None, matvecs, method, Status.NON_FINITE, product_dtype(op))
    return DiagonalResult(estimate, stderr, matvecs, method, status, product_dtype(op))


def exact_diagonal(A: object) -> DiagonalResult:
    r"""The diagonal :math:`A_{ii} = e_i^\top A e_i` from ``P`` products with unit vectors,
    ``A.chunk_size`` at a time; only the diagonal of each block is kept. For small ``P``
    or as a reference.

    Args:
        A: a hesse operator or a square floating point tensor.

    Returns:
        A :class:`DiagonalResult` with method ``"exact"``, status ``"converged"`` and zero
        standard errors.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> exact_diagonal(A).estimate
        tensor([2., 3.])
    """
    op = promote(as_operator(A, allow_empty=True))  # an empty diagonal for an empty A
    n = op.shape[0]
    parts: list[Tensor] = []
    try:
        for start in range(0, n, op.chunk_size):
            k = min(op.chunk_size, n - start)
            E = torch.zeros(n, k, dtype=op.dtype, device=op.device)
            cols = torch.arange(k, device=op.device)
            E[start + cols, cols] = 1
            parts.append((op @ E)[start + cols, cols])
    except NonFiniteError:
        return _finish(op, "exact", None, None, start + k)
    d = torch.cat(parts) if parts else torch.zeros(0, dtype=op.dtype, device=op.device)
    return _finish(op, "exact", d, torch.zeros_like(d), n, Status.CONVERGED)


def probe_diagonal(
    matvec: Callable[[list[Tensor]], Sequence[Tensor]], z: Sequence[Tensor]
) -> list[Tensor]:
    r"""The probe step of the Bekas-Kokiopoulou-Saad (Hutchinson) diagonal estimator,
    :math:`z \odot A z`: with independent random signs in :math:`z` its expectation is
    :math:`\operatorname{diag}(A)`.

    The one kernel of :func:`hutchinson_diagonal` (``z`` one ``(P, k)`` block of ``k``
    probes as columns, ``matvec`` the operator's product) and of
    :func:`hesse.solvers.hutchinson_diagonal_probe` (``z`` one tensor per parameter,
    ``matvec`` a Hessian-vector product over the parameters): the estimators differ in
    how they draw and average the probes, not in the step.

    Args:
        matvec: maps the list ``z`` to :math:`A z`, one tensor per tensor of ``z``.
        z: the probe, as a list of tensors (the blocks of one vector, or of a matrix).

    Returns:
        :math:`z_i \odot (A z)_i` for each block ``i``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> z = torch.tensor([1.0, -1.0])
        >>> probe_diagonal(lambda v: [A @ v[0]], [z])  # z * (A z) = (1, 2)
        [tensor([1., 2.])]
    """
    Az = matvec(list(z))
    if len(Az) != len(z):
        raise ValueError(
            f"the product must return one tensor per tensor of the probe ({len(z)}), got {len(Az)}"
        )
    return [zi * azi for zi, azi in zip(z, Az)]


def hutchinson_diagonal(
    A: object,
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> DiagonalResult:
    r"""The Bekas-Kokiopoulou-Saad (stochastic Hutchinson) diagonal estimator.

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{m}\sum_{i=1}^m z_i \odot A z_i, \qquad
        z_i \in \{-1, +1\}^P \text{ independent, uniform},

    unbiased, with variance :math:`\sum_{j \ne k} A_{kj}^2 / m` in entry :math:`k`. The
    per-entry standard error is the sample standard deviation over the probes divided by
    :math:`\sqrt{m}` (accumulated batch by batch: memory :math:`O(P \cdot \text{batch})`).

    Reference: Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix",
    Applied Numerical Mathematics 57, 2007.

    Args:
        A: a hesse operator or a square floating point tensor.
        num_matvecs: the number of probes ``m`` (at least 2, for the standard errors).
        seed, generator: the source of the probes (give one at most; same seed, same result).
        batch_size: most probes per product; by default ``A.chunk_size``.

    Returns:
        A :class:`DiagonalResult` with method ``"hutchinson"``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> hutchinson_diagonal(A, 10, seed=0).estimate  # diagonal: every probe is exact
        tensor([1., 2., 3.])
    """
    m = check_budget(num_matvecs, 2, "hutchinson_diagonal", "two probes for standard errors")
    op, g, batch = prepare(A, seed, generator, batch_size)
    n = op.shape[0]
    mean = torch.zeros(n, dtype=op.dtype, device=op.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations from the mean
    count = 0
    for start in range(0, m, batch):
        Z = sign_probes(n, min(batch, m - start), op, g)
        try:
            (V,) = probe_diagonal(lambda z: [op @ z[0]], [Z])  # one probe per column
        except NonFiniteError:
            return _finish(op, "hutchinson", None, None, start + Z.shape[1])
        # merge the batch's mean and squared deviations (Chan, Golub, LeVeque)
        k, bmean = V.shape[1], V.mean(1)
        delta = bmean - mean
        m2 = m2 + ((V - bmean[:, None]) ** 2).sum(1) + delta**2 * (count * k / (count + k))
        mean = mean + delta * (k / (count + k))
        count += k
    stderr = torch.sqrt(m2 / ((m - 1) * m))
    return _finish(op, "hutchinson", mean, stderr, m)


def xdiag(
    A: object,
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> DiagonalResult:
    r"""XDiag, the exchangeable diagonal estimator: a low-rank part from all probes but one,
    plus the Bekas-Kokiopoulou-Saad estimator on the rest with the probe left out.

    With :math:`m = \lfloor \text{num\_matvecs}/2 \rfloor` random sign probes
    :math:`\Omega` and :math:`Q_{(i)}` an orthonormal basis of the range of
    :math:`A\Omega_{-i}`,

    .. math::
        \hat d_i = \operatorname{diag}(Q_{(i)}Q_{(i)}^\top A)
            + \omega_i \odot (I - Q_{(i)}Q_{(i)}^\top) A\omega_i, \qquad
        \operatorname{diag}(A) \approx \frac{1}{m}\sum_{i=1}^m \hat d_i,

    computed from one QR factorisation :math:`A\Omega = QR` and :math:`A^\top Q = AQ`
    (``2m`` products). The per-entry standard error is the standard deviation of the
    :math:`\hat d_i` over :math:`\sqrt{m}`, as for XTrace (the reference code gives
    none). When :math:`A\Omega` is rank-deficient or ``m = P``, the estimate is the exact
    :math:`\operatorname{diag}(QQ^\top A)`, with zero standard errors.

    Reference: Epperly, Tropp, Webber, "XTrace: making the most of every sample in
    stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024, section 4; the
    formulas follow the authors' MATLAB code (``xdiag.m``), which uses random signs.

    Args:
        A: a symmetric hesse operator or a symmetric square floating point tensor (the
            method needs products with :math:`A^\top`).
        num_matvecs: the budget (at least 4: two probes, two products each).
        seed, generator: the source of the probes (give one at most; same seed, same result).
        batch_size: most columns per product; by default ``A.chunk_size``.

    Returns:
        A :class:`DiagonalResult` with method ``"xdiag"``.

    Example:
        >>> U = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64)).Q
        >>> A = U @ torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)) @ U.T
        >>> r = xdiag(A, 20, seed=0)  # rank 5 < 10 probes: exact
        >>> torch.allclose(r.estimate, A.diagonal())
        True
    """
    budget = check_budget(num_matvecs, 4, "xdiag", "two probes, two products each")
    op, g, batch = prepare(A, seed, generator, batch_size)
    if not op.symmetric:
        raise ValueError(
            "xdiag needs products with the transpose of A, so A must be symmetric; "
            "use hutchinson_diagonal for a non-symmetric operator"
        )
    n = op.shape[0]
    m = min(budget // 2, n)
    Om = sign_probes(n, m, op, g)
    try:
        Y = apply(op, Om, batch)
        Q, R = torch.linalg.qr(Y)
        Z = apply(op, Q, batch)  # Aᵀ Q, as A is symmetric
    except NonFiniteError:
        return _finish(op, "xdiag", None, None, m)
    dQZ = (Q * Z).sum(1)  # diag(Q Qᵀ A)
    if m == n or rank_deficient(R, op):
        return _finish(op, "xdiag", dQZ, torch.zeros_like(dQZ), 2 * m)
    E = xdiag_estimates(Om, Y, Q, R, Z, dQZ)
    return _finish(op, "xdiag", E.mean(1), E.std(1) / math.sqrt(m), 2 * m)


def xdiag_estimates(Om: Tensor, Y: Tensor, Q: Tensor, R: Tensor, Z: Tensor, dQZ: Tensor) -> Tensor:
    r"""The ``(P, m)`` leave-one-out estimates :math:`\hat d_i` of XDiag, from
    :math:`A\Omega = QR` and :math:`Z = A^\top Q` (``xdiag.m``, one column per probe).

    With :math:`q_i = Qs_i` (:func:`leave_one_out_basis`) and :math:`T = Z^\top\Omega`:
    :math:`\operatorname{diag}(Q_{(i)}Q_{(i)}^\top A) = \operatorname{diag}(QQ^\top A) -
    q_i \odot Zs_i` and :math:`(I - Q_{(i)}Q_{(i)}^\top)A\omega_i = y_i - Qt_i + q_i
    (s_i^\top t_i)`.
    """
    S = leave_one_out_basis(R)
    T = Z.T @ Om
    QS = Q @ S
    sT = (S * T).sum(0)  # s_iᵀ t_i
    return dQZ[:, None] - QS * (Z @ S) + Om * (Y - Q @ T + QS * sT)
