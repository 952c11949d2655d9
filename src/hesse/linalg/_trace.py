r"""Stochastic trace estimators: Girard-Hutchinson, Hutch++ and XTrace.

Each estimates :math:`\operatorname{tr}(A)` from products ``A @ V`` with a fixed budget of
matrix-vector products (matvecs) and returns a :class:`TraceResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core import NonFiniteError
from hesse._core._progress import report
from hesse._core._random import rademacher
from hesse.linalg._common import (
    Result,
    Status,
    advice,
    as_operator,
    check_choice,
    check_positive_int,
    make_generator,
    product_dtype,
    promote,
)
from hesse.operators import CurvatureOperator

XTRACE_PROBES = ("improved", "sphere", "signs")


@dataclass(frozen=True)
class TraceResult(Result):
    """The result of a trace estimator.

    Attributes:
        estimate: the estimate of :math:`\\operatorname{tr}(A)`; NaN unless the status is
            ``"budget"``.
        stderr: an estimate of its standard error (of ``|estimate - tr(A)|``).
        matvecs: the number of matrix-vector products used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        status: ``Status.BUDGET`` when the budget was spent normally, ``Status.NON_FINITE``
            when a product or the estimate was not finite.
        dtype: the dtype the products were computed in (the operator's; for float16 and
            bfloat16 the probes are cast to it for each product and the rest of the
            estimator runs in float32).
    """

    OK = (Status.BUDGET,)

    estimate: float
    stderr: float
    matvecs: int
    method: str
    status: Status
    dtype: torch.dtype

    @property
    def message(self) -> str:
        if self.success:
            return (
                f"{self.method}: {self.estimate:.6g} ± {self.stderr:.2g} "
                f"from {self.matvecs} products"
            )
        return (
            f"{self.method}: a product with the operator or the estimate was not finite "
            f"after {self.matvecs} products; {advice(self.status)}"
        )


# -- shared helpers ---------------------------------------------------------------------
#: The fewest products each trace estimator of :func:`hesse.trace` accepts.
MIN_MATVECS = {"hutchinson": 2, "hutch++": 6, "xtrace": 4}


def check_budget(value: object, minimum: int, method: str, why: str) -> int:
    """``num_matvecs`` as an int, or a ValueError that names the method's minimum; the
    budget is announced to :func:`hesse.progress` (the products left give the time left)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method} needs num_matvecs >= {minimum} ({why}), got {value!r}")
    report("budget", value)
    return value


def prepare(
    A: object, seed: int | None, generator: torch.Generator | None, batch_size: int | None
) -> tuple[CurvatureOperator, torch.Generator, int]:
    """The operator (promoted: see :func:`~hesse.linalg._common.promote`), the probe
    generator and the number of columns per product."""
    op = promote(as_operator(A))  # refuses an empty operator
    batch = op.chunk_size if batch_size is None else check_positive_int(batch_size, "batch_size")
    return op, make_generator(seed, generator, op.device, op), batch


def signs(n: int, k: int, op: CurvatureOperator, g: torch.Generator) -> Tensor:
    """An ``(n, k)`` matrix of random signs, drawn row by row per probe so that (on CPU) the
    probes do not depend on how many are drawn at once."""
    return rademacher((k, n), dtype=op.dtype, device=op.device, generator=g).T.contiguous()


def apply(op: CurvatureOperator, V: Tensor, batch: int) -> Tensor:
    """``op @ V``, at most ``batch`` columns at a time."""
    if V.shape[1] <= batch:
        return op @ V
    return torch.cat([op @ c for c in torch.split(V, batch, dim=1)], dim=1)


def failed(op: CurvatureOperator, method: str, matvecs: int) -> TraceResult:
    return TraceResult(math.nan, math.nan, matvecs, method, Status.NON_FINITE, product_dtype(op))


def finish(
    op: CurvatureOperator, method: str, estimate: Tensor, stderr: Tensor | float, matvecs: int
) -> TraceResult:
    """A result with status ``BUDGET``, or ``NON_FINITE`` if the numbers are not finite."""
    est, err = float(estimate), float(stderr)
    if not (math.isfinite(est) and math.isfinite(err)):
        return failed(op, method, matvecs)
    return TraceResult(est, err, matvecs, method, Status.BUDGET, product_dtype(op))


# -- Girard-Hutchinson -------------------------------------------------------------------
def hutchinson_trace(
    A: object,
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> TraceResult:
    r"""The Girard-Hutchinson trace estimator with Rademacher probes.

    .. math::
        \operatorname{tr}(A) \approx \frac{1}{m} \sum_{i=1}^m z_i^\top A z_i, \qquad
        z_i \in \{-1, +1\}^P \text{ independent, uniform},

    with standard error :math:`\hat\sigma / \sqrt{m}` from the sample standard deviation
    :math:`\hat\sigma` of the :math:`z_i^\top A z_i`. The variance is
    :math:`2 (\|A\|_F^2 - \sum_i A_{ii}^2) / m` for symmetric ``A``: the error falls as
    :math:`1/\sqrt{m}`.

    References: Girard (1989); Hutchinson, "A stochastic estimator of the trace of the
    influence matrix for Laplacian smoothing splines" (1990).

    Args:
        A: a hesse operator or a square floating point tensor.
        num_matvecs: the number of probes ``m`` (at least 2, for the standard error).
        seed, generator: the source of the probes (give one at most; same seed, same result).
        batch_size: most probes per product; by default ``A.chunk_size``.

    Returns:
        A :class:`TraceResult` with method ``"hutchinson"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 5, generator=g, dtype=torch.float64)
        >>> A = X @ X.T + 0.1 * torch.eye(100, dtype=torch.float64)  # rank 5 + flat tail
        >>> r = hutchinson_trace(A, 30, seed=0)
        >>> abs(r.estimate - A.trace().item()) < 3 * r.stderr, r.matvecs
        (True, 30)
    """
    m = check_budget(
        num_matvecs,
        MIN_MATVECS["hutchinson"],
        "hutchinson_trace",
        "two probes for a standard error",
    )
    op, g, batch = prepare(A, seed, generator, batch_size)
    n, values, used = op.shape[0], [], 0
    for start in range(0, m, batch):
        Z = signs(n, min(batch, m - start), op, g)
        used += Z.shape[1]
        try:
            values.append((Z * (op @ Z)).sum(0))
        except NonFiniteError:
            return failed(op, "hutchinson", used)
    v = torch.cat(values)
    return finish(op, "hutchinson", v.mean(), v.std() / math.sqrt(m), m)


# -- Hutch++ -----------------------------------------------------------------------------
def hutchpp_trace(
    A: object,
    num_matvecs: int = 100,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> TraceResult:
    r"""The Hutch++ trace estimator: an exact trace on a sketched range plus Hutchinson on
    the rest.

    With :math:`k = \lfloor m/3 \rfloor` random sign vectors :math:`S` and
    :math:`Q = \operatorname{orth}(AS)`,

    .. math::
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{m - 2k} \sum_{i=1}^{m-2k} g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i,

    with random sign vectors :math:`g_i`. The first term is exact on the top of the
    spectrum, so for matrices with decaying spectra the error falls as :math:`1/m` instead
    of :math:`1/\sqrt{m}`. The standard error is that of the Hutchinson term. Uses
    ``num_matvecs`` products (``2P`` and an exact trace when ``num_matvecs >= 3P``).

    Reference: Meyer, Musco, Musco, Woodruff, "Hutch++: optimal stochastic trace
    estimation", SOSA 2021.

    Args:
        A: a hesse operator or a square floating point tensor.
        num_matvecs: the budget ``m`` (at least 6: two products per sketch vector and two
            Hutchinson probes).
        seed, generator: the source of the probes (give one at most; same seed, same result).
        batch_size: most columns per product; by default ``A.chunk_size``.

    Returns:
        A :class:`TraceResult` with method ``"hutch++"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 5, generator=g, dtype=torch.float64)
        >>> A = X @ X.T + 0.1 * torch.eye(100, dtype=torch.float64)  # rank 5 + flat tail
        >>> r = hutchpp_trace(A, 30, seed=0)  # error about 1e-4 of the trace (Hutchinson: 0.2)
        >>> abs(r.estimate - A.trace().item()) < 3 * r.stderr, r.matvecs
        (True, 30)
    """
    m = check_budget(
        num_matvecs, MIN_MATVECS["hutch++"], "hutchpp_trace", "a sketch and two Hutchinson probes"
    )
    op, g, batch = prepare(A, seed, generator, batch_size)
    n = op.shape[0]
    k = min(m // 3, n)
    used = 0
    try:
        S = signs(n, k, op, g)
        used += k
        Q = torch.linalg.qr(apply(op, S, batch)).Q
        used += k
        exact = torch.trace(Q.T @ apply(op, Q, batch))
        if k == n:  # Q spans everything: the trace is exact
            return finish(op, "hutch++", exact, 0.0, used)
        G = signs(n, m - 2 * k, op, g)
        G = G - Q @ (Q.T @ G)
        used += G.shape[1]
        AG = apply(op, G, batch)
    except NonFiniteError:
        return failed(op, "hutch++", used)
    v = (G * (AG - Q @ (Q.T @ AG))).sum(0)
    return finish(op, "hutch++", exact + v.mean(), v.std() / math.sqrt(v.numel()), used)


# -- XTrace ------------------------------------------------------------------------------
def xtrace(
    A: object,
    num_matvecs: int = 100,
    *,
    probes: str = "improved",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> TraceResult:
    r"""XTrace, the exchangeable trace estimator: Hutch++ with every probe used both to
    sketch the range and to estimate the rest.

    With :math:`m = \lfloor \text{num\_matvecs}/2 \rfloor` probes :math:`\Omega` and, for
    each :math:`i`, an orthonormal basis :math:`Q_{(i)}` of the range of
    :math:`A\Omega_{-i}` (all probes but :math:`\omega_i`),

    .. math::
        \hat t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
            + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) A (I - Q_{(i)}Q_{(i)}^\top) \omega_i,
        \qquad \operatorname{tr}(A) \approx \frac{1}{m}\sum_{i=1}^m \hat t_i,

    with standard error :math:`\operatorname{std}(\hat t_i)/\sqrt{m}`. All :math:`m`
    leave-one-out terms come from one QR factorisation :math:`A\Omega = QR` and
    :math:`AQ` (rank-one downdates), so the cost is :math:`2m` products. When
    :math:`A\Omega` is rank-deficient (``A`` has rank below ``m``) or ``m = P``, the range
    is captured and the estimate is the exact :math:`\operatorname{tr}(Q^\top A Q)`, with
    standard error 0.

    Reference: Epperly, Tropp, Webber, "XTrace: making the most of every sample in
    stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024; the formulas
    follow the authors' MATLAB code (``xtrace.m``).

    Args:
        A: a hesse operator or a square floating point tensor.
        num_matvecs: the budget (at least 4: two probes, two products each).
        probes: ``"improved"`` (the authors' default: uniform on the sphere of radius
            :math:`\sqrt{P}`, each rescaled so that its part outside :math:`Q_{(i)}` has
            the expected length, section 2.3 of the paper), ``"sphere"`` (uniform on that
            sphere) or ``"signs"`` (Rademacher).
        seed, generator: the source of the probes (give one at most; same seed, same result).
        batch_size: most columns per product; by default ``A.chunk_size``.

    Returns:
        A :class:`TraceResult` with method ``"xtrace"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 5, generator=g, dtype=torch.float64)
        >>> A = X @ X.T + 0.1 * torch.eye(100, dtype=torch.float64)  # rank 5 + flat tail
        >>> r = xtrace(A, 30, seed=0)  # error about 1e-6 of the trace
        >>> abs(r.estimate - A.trace().item()) < 3 * r.stderr, r.matvecs
        (True, 30)
    """
    budget = check_budget(
        num_matvecs, MIN_MATVECS["xtrace"], "xtrace", "two probes, two products each"
    )
    probes = check_choice(probes, "probes", XTRACE_PROBES)
    op, g, batch = prepare(A, seed, generator, batch_size)
    n = op.shape[0]
    m = min(budget // 2, n)
    Om = xtrace_probes(n, m, probes, op, g)
    try:
        Y = apply(op, Om, batch)
        Q, R = torch.linalg.qr(Y)
        Z = apply(op, Q, batch)
    except NonFiniteError:
        return failed(op, "xtrace", m)
    H = Q.T @ Z
    if m == n or rank_deficient(R, op):
        return finish(op, "xtrace", torch.trace(H), 0.0, 2 * m)
    ests = xtrace_estimates(Om, Q, R, Z, H, improved=probes == "improved")
    return finish(op, "xtrace", ests.mean(), ests.std() / math.sqrt(m), 2 * m)


def xtrace_probes(n: int, m: int, probes: str, op: CurvatureOperator, g: torch.Generator) -> Tensor:
    """``m`` probes of length ``n``: random signs, or Gaussians normalised to norm √n."""
    if probes == "signs":
        return signs(n, m, op, g)
    Om = torch.randn((n, m), generator=g, dtype=op.dtype, device=op.device)
    return Om * (math.sqrt(n) / torch.linalg.vector_norm(Om, dim=0))


def rank_deficient(R: Tensor, op: CurvatureOperator) -> bool:
    """Whether the triangular factor ``R`` of ``AΩ = QR`` is singular to the precision of
    ``op``'s products."""
    d = R.diagonal().abs()
    return bool(d.min() <= torch.finfo(product_dtype(op)).eps * d.max())


def leave_one_out_basis(R: Tensor) -> Tensor:
    r"""The ``(m, m)`` matrix :math:`S` whose unit column :math:`s_i` makes :math:`Qs_i` the
    direction of :math:`\operatorname{range}(A\Omega)` orthogonal to
    :math:`A\Omega_{-i}`, so that :math:`Q_{(i)}Q_{(i)}^\top = QQ^\top - Qs_is_i^\top Q^\top`.
    As in the reference code, the rows of :math:`I - \operatorname{triu}(R, 1) R^{-1}`
    (which equals :math:`\operatorname{diag}(R) R^{-1}`), normalised."""
    upper = torch.triu(R, diagonal=1)
    X = torch.eye(R.shape[0], dtype=R.dtype, device=R.device) - torch.linalg.solve_triangular(
        R, upper, upper=True, left=False
    )
    return (X / torch.linalg.vector_norm(X, dim=1, keepdim=True)).T


def xtrace_estimates(
    Om: Tensor, Q: Tensor, R: Tensor, Z: Tensor, H: Tensor, improved: bool
) -> Tensor:
    r"""The ``m`` leave-one-out estimates :math:`\hat t_i` of XTrace, from
    :math:`A\Omega = QR`, :math:`Z = AQ` and :math:`H = Q^\top Z` (``xtrace_helper.m``).

    :math:`\operatorname{tr}(Q_{(i)}^\top A Q_{(i)}) = \operatorname{tr}(H) - s_i^\top H
    s_i`; the other terms expand the deflated quadratic form in
    :math:`W = Q^\top\Omega`, :math:`T = Z^\top\Omega` and :math:`S`. The reference's
    :math:`\operatorname{diag}(\Omega^\top A\Omega) - \operatorname{diag}(W^\top R)` is
    zero (:math:`A\Omega = QR`) and left out, as in ``xtrace_helper.m``.
    """
    n, m = Om.shape
    S = leave_one_out_basis(R)
    W = Q.T @ Om
    T = Z.T @ Om
    HW = H @ W

    def dp(X: Tensor, Y: Tensor) -> Tensor:  # diag(Xᵀ Y)
        return (X * Y).sum(0)

    dSW, dSHS = dp(S, W), dp(S, H @ S)
    quad = -dp(T, W) + dp(W, HW) + dSW * dp(S, R - HW) + dSW**2 * dSHS + dp(T - H.T @ W, S) * dSW
    if improved:
        # ‖(I - Q_(i)Q_(i)ᵀ) ω_i‖² = n - ‖w_i‖² + (s_iᵀw_i)²; rescale it to n - m + 1,
        # its expectation for a probe uniform on the sphere.
        quad = quad * ((n - m + 1) / (n - W.pow(2).sum(0) + dSW**2))
    return torch.trace(H) - dSHS + quad
