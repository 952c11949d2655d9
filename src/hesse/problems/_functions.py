"""Classic unconstrained test functions, written in torch.

Most come from Moré, Garbow & Hillstrom (1981), "Testing unconstrained optimization
software", ACM Trans. Math. Softw. 7(1), 17-41 ("MGH #k" is their function k): each is a sum
of squares ``f(x) = sum_i r_i(x)**2`` with their standard starting point and the minimum
value they report, to the digits we confirmed by minimising (MGH print six, and two of
those, Kowalik-Osborne's and Chebyquad's, are rounded below the true minimum). The formulas
are ours, written from the paper; the extended Rosenbrock function uses the chained form of
``scipy.optimize.rosen``. ``log-barrier-quadratic`` is a separable barrier problem with a
closed-form minimiser.

Every function is plain torch on one vector ``x`` of shape ``(n,)``: differentiable twice by
autograd, free of in-place operations and host synchronisation (so ``torch.func.vmap`` works),
and it keeps the dtype and device of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassicFunction:
    """A test function with its standard start and known minimum.

    Attributes:
        name: Registry name, e.g. ``"rosenbrock"``.
        n: Number of variables.
        fun: Maps ``x`` of shape ``(n,)`` to a scalar tensor.
        start: The standard starting point.
        f_star: The global minimum value, or the documented one where the global is not
            known (to 9 or more significant digits, confirmed by minimisation).
        x_star: A minimiser where one is known in closed form, else ``None``.
        reference: Where the function comes from, e.g. ``"MGH #1"``.

    Calling the object checks the shape of ``x``; ``fun`` itself does not.

    Example:
        >>> f = classic_function("rosenbrock")
        >>> f(f.x0())
        tensor(24.2000, dtype=torch.float64)
        >>> f(torch.tensor(f.x_star, dtype=torch.float64))
        tensor(0., dtype=torch.float64)
    """

    name: str
    n: int
    fun: Callable[[Tensor], Tensor]
    start: tuple[float, ...]
    f_star: float
    x_star: tuple[float, ...] | None
    reference: str

    def x0(
        self,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The standard starting point times ``scale``, as a new tensor.

        Args:
            scale: Factor on the start (MGH also use 10 and 100).
            dtype: Floating dtype of the result.
            device: Device of the result.

        Returns:
            A tensor of shape ``(n,)``.
        """
        return torch.tensor(self.start, dtype=dtype, device=device) * scale

    def __call__(self, x: Tensor) -> Tensor:
        """The value at ``x`` of shape ``(n,)``, a scalar tensor."""
        if x.shape != (self.n,):
            raise ValueError(
                f"{self.name} takes a vector of shape ({self.n},), got {tuple(x.shape)}"
            )
        return self.fun(x)


def _const(values: Sequence[float], x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def _index(x: Tensor, start: int = 1) -> Tensor:
    """``start, start + 1, ...`` with the dtype and device of ``x`` (one per entry)."""
    return torch.arange(start, start + x.shape[0], dtype=x.dtype, device=x.device)


def _sumsq(residuals: Tensor) -> Tensor:
    return (residuals * residuals).sum()


# ---------------------------------------------------------------------------- fixed size


def _rosenbrock(x: Tensor) -> Tensor:
    """MGH #1: ``r = (10 (x2 - x1**2), 1 - x1)``."""
    return _sumsq(torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]))


def _freudenstein_roth(x: Tensor) -> Tensor:
    """MGH #2. Global minimum 0 at (5, 4); a local one, 48.9842, at (11.41, -0.8968)."""
    x1, x2 = x[0], x[1]
    return _sumsq(
        torch.stack(
            [
                -13 + x1 + ((5 - x2) * x2 - 2) * x2,
                -29 + x1 + ((x2 + 1) * x2 - 14) * x2,
            ]
        )
    )


def _powell_badly_scaled(x: Tensor) -> Tensor:
    """MGH #3. Minimum 0 at (1.098e-5, 9.106)."""
    x1, x2 = x[0], x[1]
    return _sumsq(torch.stack([1e4 * x1 * x2 - 1, torch.exp(-x1) + torch.exp(-x2) - 1.0001]))


def _brown_badly_scaled(x: Tensor) -> Tensor:
    """MGH #4. Minimum 0 at (1e6, 2e-6)."""
    x1, x2 = x[0], x[1]
    return _sumsq(torch.stack([x1 - 1e6, x2 - 2e-6, x1 * x2 - 2]))


def _beale(x: Tensor) -> Tensor:
    """MGH #5: ``r_i = y_i - x1 (1 - x2**i)``, y = (1.5, 2.25, 2.625)."""
    i = _const((1.0, 2.0, 3.0), x)
    y = _const((1.5, 2.25, 2.625), x)
    return _sumsq(y - x[0] * (1 - x[1] ** i))


def _jennrich_sampson(x: Tensor) -> Tensor:
    """MGH #6 with m = 10: ``r_i = 2 + 2i - (exp(i x1) + exp(i x2))``."""
    i = _const(range(1, 11), x)
    return _sumsq(2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1])))


def _helical_valley(x: Tensor) -> Tensor:
    """MGH #7, with MGH's branch of the angle: ``theta`` in (-1/4, 3/4)."""
    x1, x2, x3 = x[0], x[1], x[2]
    theta = torch.atan2(x2, x1) / (2 * math.pi)
    theta = torch.where(theta < -0.25, theta + 1, theta)
    radius = torch.sqrt(x1 * x1 + x2 * x2)
    return _sumsq(torch.stack([10 * (x3 - 10 * theta), 10 * (radius - 1), x3]))


_BARD_Y = (0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39)


def _bard(x: Tensor) -> Tensor:
    """MGH #8: ``r_i = y_i - (x1 + u_i / (v_i x2 + w_i x3))``, u = i, v = 16 - i, w = min.

    MGH also report f = 17.4286 at (0.8406, -inf, -inf).
    """
    u = _const(range(1, 16), x)
    v = 16 - u
    w = torch.minimum(u, v)
    return _sumsq(_const(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2])))


_GAUSSIAN_Y = (
    0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
    0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009,
)  # fmt: skip


def _gaussian(x: Tensor) -> Tensor:
    """MGH #9: ``r_i = x1 exp(-x2 (t_i - x3)**2 / 2) - y_i``, t_i = (8 - i) / 2."""
    t = (8 - _const(range(1, 16), x)) / 2
    return _sumsq(x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _const(_GAUSSIAN_Y, x))


_MEYER_Y = (
    34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0,
    8261.0, 7030.0, 6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0,
)  # fmt: skip


def _meyer(x: Tensor) -> Tensor:
    """MGH #10: ``r_i = x1 exp(x2 / (t_i + x3)) - y_i``, t_i = 45 + 5i."""
    t = 45 + 5 * _const(range(1, 17), x)
    return _sumsq(x[0] * torch.exp(x[1] / (t + x[2])) - _const(_MEYER_Y, x))


def _gulf(x: Tensor) -> Tensor:
    """MGH #11 with m = 99: ``r_i = exp(-|y_i - x2|**x3 / x1) - t_i``.

    ``t_i = i / 100`` and ``y_i = 25 + (-50 log t_i)**(2/3)``; MGH's printed "y_i m i x2"
    reads ``y_i - x2``.
    """
    t = _const(range(1, 100), x) / 100
    y = 25 + (-50 * torch.log(t)) ** (2 / 3)
    return _sumsq(torch.exp(-(torch.abs(y - x[1]) ** x[2]) / x[0]) - t)


def _box_3d(x: Tensor) -> Tensor:
    """MGH #12 with m = 10: ``r_i = e^(-t x1) - e^(-t x2) - x3 (e^(-t) - e^(-10 t))``."""
    t = _const(range(1, 11), x) / 10
    return _sumsq(
        torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))
    )


def _powell_singular_residuals(x: Tensor) -> Tensor:
    """MGH #13 on each block of four variables (rows); the Hessian at 0 is singular."""
    b = x.reshape(-1, 4)
    x1, x2, x3, x4 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return torch.stack(
        [
            x1 + 10 * x2,
            math.sqrt(5) * (x3 - x4),
            (x2 - 2 * x3) ** 2,
            math.sqrt(10) * (x1 - x4) ** 2,
        ]
    )


def _powell_singular(x: Tensor) -> Tensor:
    """MGH #13 (n = 4) and MGH #22, the extended form (n a multiple of 4)."""
    return _sumsq(_powell_singular_residuals(x))


def _wood(x: Tensor) -> Tensor:
    """MGH #14."""
    x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
    return _sumsq(
        torch.stack(
            [
                10 * (x2 - x1 * x1),
                1 - x1,
                math.sqrt(90) * (x4 - x3 * x3),
                1 - x3,
                math.sqrt(10) * (x2 + x4 - 2),
                (x2 - x4) / math.sqrt(10),
            ]
        )
    )


_KOWALIK_Y = (
    0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246,
)  # fmt: skip
_KOWALIK_U = (4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625)


def _kowalik_osborne(x: Tensor) -> Tensor:
    """MGH #15: ``r_i = y_i - x1 (u_i**2 + u_i x2) / (u_i**2 + u_i x3 + x4)``.

    MGH also report f = 1.02734e-3 at (+inf, -14.07, -inf, -inf).
    """
    u = _const(_KOWALIK_U, x)
    model = x[0] * (u * u + u * x[1]) / (u * u + u * x[2] + x[3])
    return _sumsq(_const(_KOWALIK_Y, x) - model)


def _brown_dennis(x: Tensor) -> Tensor:
    """MGH #16 with m = 20; its residuals are themselves sums of squares."""
    t = _const(range(1, 21), x) / 5
    a = x[0] + t * x[1] - torch.exp(t)
    b = x[2] + x[3] * torch.sin(t) - torch.cos(t)
    return _sumsq(a * a + b * b)


_OSBORNE1_Y = (
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
    0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
    0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406,
)  # fmt: skip


def _osborne_1(x: Tensor) -> Tensor:
    """MGH #17: ``r_i = y_i - (x1 + x2 e^(-t_i x4) + x3 e^(-t_i x5))``, t_i = 10 (i - 1)."""
    t = 10 * _const(range(33), x)
    model = x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4])
    return _sumsq(_const(_OSBORNE1_Y, x) - model)


def _biggs_exp6(x: Tensor) -> Tensor:
    """MGH #18 with m = 13.

    ``r_i = x3 e^(-t x1) - x4 e^(-t x2) + x6 e^(-t x5) - y_i``, t_i = i / 10 and
    ``y_i = e^(-t) - 5 e^(-10 t) + 3 e^(-4 t)``. Global minimum 0 at (1, 10, 1, 5, 4, 3);
    MGH also report a local one, 5.65565e-3.
    """
    t = _const(range(1, 14), x) / 10
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return _sumsq(
        x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    )


_OSBORNE2_Y = (
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725,
    0.746, 0.679, 0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724,
    0.649, 0.649, 0.694, 0.644, 0.624, 0.661, 0.612, 0.558, 0.533, 0.495,
    0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429,
    0.523, 0.562, 0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645, 0.632,
    0.591, 0.559, 0.597, 0.625, 0.739, 0.710, 0.729, 0.720, 0.636, 0.581,
    0.428, 0.292, 0.162, 0.098, 0.054,
)  # fmt: skip


def _osborne_2(x: Tensor) -> Tensor:
    """MGH #19: one decaying exponential and three Gaussians, t_i = (i - 1) / 10."""
    t = _const(range(65), x) / 10
    model = (
        x[0] * torch.exp(-t * x[4])
        + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
        + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6])
        + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7])
    )
    return _sumsq(_const(_OSBORNE2_Y, x) - model)


# ------------------------------------------------------------------------- any size n


def _watson(x: Tensor) -> Tensor:
    """MGH #20 with m = 31: a polynomial fit to an ODE solution on t_i = i / 29."""
    n = x.shape[0]
    t = _const(range(1, 30), x) / 29
    powers = t[:, None] ** _const(range(n), x)  # (29, n): t_i ** (j - 1)
    dsum = powers[:, : n - 1] @ (_index(x)[: n - 1] * x[1:])  # sum_j (j - 1) x_j t**(j-2)
    psum = powers @ x  # sum_j x_j t**(j-1)
    r = dsum - psum**2 - 1
    return _sumsq(r) + x[0] ** 2 + (x[1] - x[0] ** 2 - 1) ** 2


def _chained_rosenbrock(x: Tensor) -> Tensor:
    """Chained Rosenbrock: ``sum_i 100 (x_{i+1} - x_i**2)**2 + (1 - x_i)**2``.

    The form of ``scipy.optimize.rosen``, not MGH #21's separable sum of n/2 independent
    pairs. Minimum 0 at all ones; for n >= 4 there is also a local minimum near x_1 = -1.
    """
    head, tail = x[:-1], x[1:]
    return (100 * (tail - head**2) ** 2 + (1 - head) ** 2).sum()


def _penalty_1(x: Tensor) -> Tensor:
    """MGH #23: ``a sum (x_i - 1)**2 + (sum x_i**2 - 1/4)**2``, a = 1e-5."""
    return 1e-5 * _sumsq(x - 1) + (_sumsq(x) - 0.25) ** 2


def _penalty_2(x: Tensor) -> Tensor:
    """MGH #24 with m = 2n and a = 1e-5."""
    i = _index(x)[1:]  # 2, ..., n
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    e = torch.exp(x / 10)
    pairs = e[1:] + e[:-1] - y
    singles = e[1:] - math.exp(-0.1)
    weights = _index(x).flip(0)  # n - j + 1
    last = (weights * x * x).sum() - 1
    return (x[0] - 0.2) ** 2 + 1e-5 * (_sumsq(pairs) + _sumsq(singles)) + last**2


def _variably_dimensioned(x: Tensor) -> Tensor:
    """MGH #25: ``sum (x_i - 1)**2 + s**2 + s**4`` with ``s = sum i (x_i - 1)``."""
    s = (_index(x) * (x - 1)).sum()
    return _sumsq(x - 1) + s**2 + s**4


def _trigonometric(x: Tensor) -> Tensor:
    """MGH #26: ``r_i = n - sum_j cos x_j + i (1 - cos x_i) - sin x_i``.

    Global minimum 0 at x = 0; from the standard start (n = 10) local methods stop at a local
    minimum, 2.79506e-5.
    """
    c = torch.cos(x)
    return _sumsq(x.shape[0] - c.sum() + _index(x) * (1 - c) - torch.sin(x))


def _brown_almost_linear(x: Tensor) -> Tensor:
    """MGH #27: ``r_i = x_i + sum_j x_j - (n + 1)`` for i < n, ``r_n = prod_j x_j - 1``."""
    n = x.shape[0]
    linear = x[:-1] + x.sum() - (n + 1)
    return _sumsq(linear) + (torch.prod(x) - 1) ** 2


def _pad(x: Tensor) -> Tensor:
    """``x`` with a zero at each end (the boundary values x_0 = x_{n+1} = 0)."""
    zero = x.new_zeros(1)
    return torch.cat([zero, x, zero])


def _discrete_boundary_value(x: Tensor) -> Tensor:
    """MGH #28: ``r_i = 2 x_i - x_{i-1} - x_{i+1} + h**2 (x_i + t_i + 1)**3 / 2``."""
    h = 1 / (x.shape[0] + 1)
    t = _index(x) * h
    p = _pad(x)
    return _sumsq(2 * x - p[:-2] - p[2:] + h * h * (x + t + 1) ** 3 / 2)


def _broyden_tridiagonal(x: Tensor) -> Tensor:
    """MGH #30: ``r_i = (3 - 2 x_i) x_i - x_{i-1} - 2 x_{i+1} + 1``."""
    p = _pad(x)
    return _sumsq((3 - 2 * x) * x - p[:-2] - 2 * p[2:] + 1)


def _broyden_banded(x: Tensor) -> Tensor:
    """MGH #31: ``r_i = x_i (2 + 5 x_i**2) + 1 - sum_{j in J_i} x_j (1 + x_j)``.

    ``J_i = {j != i : i - 5 <= j <= i + 1}`` (within 1..n).
    """
    n = x.shape[0]
    offset = torch.arange(n, device=x.device)[None, :] - torch.arange(n, device=x.device)[:, None]
    band = ((offset >= -5) & (offset <= 1) & (offset != 0)).to(x.dtype)
    return _sumsq(x * (2 + 5 * x * x) + 1 - band @ (x * (1 + x)))


def _chebyquad(x: Tensor) -> Tensor:
    """MGH #35 with m = n: ``r_i = mean_j T_i(x_j) - integral_0^1 T_i``.

    ``T_i`` is the Chebyshev polynomial shifted to [0, 1]; its integral is ``-1 / (i**2 - 1)``
    for even ``i`` and 0 for odd ``i``.
    """
    n = x.shape[0]
    y = 2 * x - 1
    prev, cur = torch.ones_like(y), y
    means = [cur.mean()]
    for _ in range(n - 1):
        prev, cur = cur, 2 * y * cur - prev
        means.append(cur.mean())
    integrals = [-1 / (i * i - 1) if i % 2 == 0 else 0.0 for i in range(1, n + 1)]
    return _sumsq(torch.stack(means) - _const(integrals, x))


def _log_barrier_quadratic(x: Tensor) -> Tensor:
    """``sum_i -log(x_i) + a_i x_i**2`` with ``a = linspace(1, 1000, n)``; NaN for x_i < 0."""
    a = torch.linspace(1, 1000, x.shape[0], dtype=x.dtype, device=x.device)
    return (-torch.log(x) + a * x * x).sum()


# ------------------------------------------------------------------------------ registry


def _log_barrier_minimum(n: int) -> tuple[tuple[float, ...], float]:
    a = [1 + (1000 - 1) * i / (n - 1) for i in range(n)]
    x_star = tuple(1 / math.sqrt(2 * ai) for ai in a)
    f_star = math.fsum(0.5 * math.log(2 * ai) + 0.5 for ai in a)
    return x_star, f_star


_BARRIER_X, _BARRIER_F = _log_barrier_minimum(100)

_DBV_N = 10
_DBV_T = [(j + 1) / (_DBV_N + 1) for j in range(_DBV_N)]

_ALL = (
    ClassicFunction("rosenbrock", 2, _rosenbrock, (-1.2, 1.0), 0.0, (1.0, 1.0), "MGH #1"),
    ClassicFunction(
        "rosenbrock-100",
        100,
        _chained_rosenbrock,
        (-1.2, 1.0) * 50,
        0.0,
        (1.0,) * 100,
        "MGH #21 in the chained form of scipy.optimize.rosen",
    ),
    ClassicFunction(
        "freudenstein-roth", 2, _freudenstein_roth, (0.5, -2.0), 0.0, (5.0, 4.0), "MGH #2"
    ),
    ClassicFunction(
        "powell-badly-scaled", 2, _powell_badly_scaled, (0.0, 1.0), 0.0, None, "MGH #3"
    ),
    ClassicFunction(
        "brown-badly-scaled", 2, _brown_badly_scaled, (1.0, 1.0), 0.0, (1e6, 2e-6), "MGH #4"
    ),
    ClassicFunction("beale", 2, _beale, (1.0, 1.0), 0.0, (3.0, 0.5), "MGH #5"),
    ClassicFunction(
        "jennrich-sampson", 2, _jennrich_sampson, (0.3, 0.4), 124.362182356, None, "MGH #6"
    ),
    ClassicFunction(
        "helical-valley", 3, _helical_valley, (-1.0, 0.0, 0.0), 0.0, (1.0, 0.0, 0.0), "MGH #7"
    ),
    ClassicFunction("bard", 3, _bard, (1.0, 1.0, 1.0), 8.21487731e-3, None, "MGH #8"),
    ClassicFunction("gaussian", 3, _gaussian, (0.4, 1.0, 0.0), 1.12793277e-8, None, "MGH #9"),
    ClassicFunction("meyer", 3, _meyer, (0.02, 4000.0, 250.0), 87.9458552, None, "MGH #10"),
    ClassicFunction("gulf", 3, _gulf, (5.0, 2.5, 0.15), 0.0, (50.0, 25.0, 1.5), "MGH #11"),
    ClassicFunction("box-3d", 3, _box_3d, (0.0, 10.0, 20.0), 0.0, (1.0, 10.0, 1.0), "MGH #12"),
    ClassicFunction(
        "powell-singular", 4, _powell_singular, (3.0, -1.0, 0.0, 1.0), 0.0, (0.0,) * 4, "MGH #13"
    ),
    ClassicFunction("wood", 4, _wood, (-3.0, -1.0, -3.0, -1.0), 0.0, (1.0,) * 4, "MGH #14"),
    ClassicFunction(
        "kowalik-osborne",
        4,
        _kowalik_osborne,
        (0.25, 0.39, 0.415, 0.39),
        3.07505603849e-4,
        None,
        "MGH #15",
    ),
    ClassicFunction(
        "brown-dennis", 4, _brown_dennis, (25.0, 5.0, -5.0, -1.0), 85822.2016, None, "MGH #16"
    ),
    ClassicFunction(
        "osborne-1",
        5,
        _osborne_1,
        (0.5, 1.5, -1.0, 0.01, 0.02),
        5.4648947e-5,
        None,
        "MGH #17",
    ),
    ClassicFunction(
        "biggs-exp6",
        6,
        _biggs_exp6,
        (1.0, 2.0, 1.0, 1.0, 1.0, 1.0),
        0.0,
        (1.0, 10.0, 1.0, 5.0, 4.0, 3.0),
        "MGH #18",
    ),
    ClassicFunction(
        "osborne-2",
        11,
        _osborne_2,
        (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
        4.01377363e-2,
        None,
        "MGH #19",
    ),
    ClassicFunction("watson", 6, _watson, (0.0,) * 6, 2.28767005e-3, None, "MGH #20"),
    ClassicFunction(
        "extended-powell",
        12,
        _powell_singular,
        (3.0, -1.0, 0.0, 1.0) * 3,
        0.0,
        (0.0,) * 12,
        "MGH #22",
    ),
    ClassicFunction(
        "penalty-1",
        10,
        _penalty_1,
        tuple(float(j) for j in range(1, 11)),
        7.08765147e-5,
        None,
        "MGH #23",
    ),
    ClassicFunction("penalty-2", 10, _penalty_2, (0.5,) * 10, 2.93660537e-4, None, "MGH #24"),
    ClassicFunction(
        "variably-dimensioned",
        10,
        _variably_dimensioned,
        tuple(1 - j / 10 for j in range(1, 11)),
        0.0,
        (1.0,) * 10,
        "MGH #25",
    ),
    ClassicFunction("trigonometric", 10, _trigonometric, (0.1,) * 10, 0.0, (0.0,) * 10, "MGH #26"),
    ClassicFunction(
        "brown-almost-linear", 10, _brown_almost_linear, (0.5,) * 10, 0.0, (1.0,) * 10, "MGH #27"
    ),
    ClassicFunction(
        "discrete-boundary-value",
        _DBV_N,
        _discrete_boundary_value,
        tuple(t * (t - 1) for t in _DBV_T),
        0.0,
        None,
        "MGH #28",
    ),
    ClassicFunction(
        "broyden-tridiagonal", 10, _broyden_tridiagonal, (-1.0,) * 10, 0.0, None, "MGH #30"
    ),
    ClassicFunction("broyden-banded", 10, _broyden_banded, (-1.0,) * 10, 0.0, None, "MGH #31"),
    ClassicFunction(
        "chebyquad",
        8,
        _chebyquad,
        tuple(j / 9 for j in range(1, 9)),
        3.51687372568e-3,
        None,
        "MGH #35",
    ),
    ClassicFunction(
        "log-barrier-quadratic",
        100,
        _log_barrier_quadratic,
        (2.0,) * 100,
        _BARRIER_F,
        _BARRIER_X,
        "hesse: separable barrier, x_i* = 1 / sqrt(2 a_i)",
    ),
)

#: The registered test functions by name.
FUNCTIONS: dict[str, ClassicFunction] = {f.name: f for f in _ALL}


def classic_function(name: str) -> ClassicFunction:
    """The registered test function called ``name``.

    Args:
        name: A key of :data:`FUNCTIONS`, e.g. ``"rosenbrock"`` (case and ``_`` for ``-``
            are forgiven).

    Returns:
        The :class:`ClassicFunction`.

    Raises:
        ValueError: If no function has that name; the message lists the known names.

    Example:
        >>> f = classic_function("wood")
        >>> f.n, f.f_star, f.reference
        (4, 0.0, 'MGH #14')
    """
    key = name.strip().lower().replace("_", "-")
    if key not in FUNCTIONS:
        raise ValueError(
            f"unknown classic function {name!r}; known: {', '.join(sorted(FUNCTIONS))}"
        )
    return FUNCTIONS[key]
