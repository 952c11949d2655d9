"""Second derivatives of a function of one tensor, ``f: Tensor -> scalar Tensor``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp

from hesse._core import check_finite, check_scalar
from hesse.func._context import second_order
from hesse.func._engine import hvp_product

HVP_MODES = ("forward-over-reverse", "reverse-over-reverse")
#: The default mode, chosen by ``benchmarks/hvp_cost.py`` (see the README's figures).
DEFAULT_HVP_MODE = "reverse-over-reverse"


def _check_point(x: object, what: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating point tensor, got dtype {x.dtype}")
    check_finite(x, what)
    return x


def _check_direction(x: Tensor, v: object) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(
            f"v must be a torch.Tensor shaped like x {tuple(x.shape)}, got {type(v).__name__}"
        )
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.dtype != x.dtype or v.device != x.device:
        raise TypeError(
            f"v must have the dtype and device of x ({x.dtype} on {x.device}), "
            f"got {v.dtype} on {v.device}"
        )
    check_finite(v, "v")
    return v


def as_directions(x: Tensor, v: object) -> tuple[Tensor, bool]:
    """``v`` as a batch ``(k, *x.shape)`` of checked directions, and whether it was one
    direction shaped like ``x``."""
    if isinstance(v, Tensor) and v.dim() == x.dim() + 1 and v.shape[1:] == x.shape:
        _check_direction(x, v[0])
        check_finite(v, "v")
        return v, False
    return _check_direction(x, v).unsqueeze(0), True


def _scalar_fn(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def wrapped(x: Tensor) -> Tensor:
        with second_order():  # kernels whose backward can be differentiated
            return check_scalar(f(x), "f(x)")

    return wrapped


def _finite(out: Tensor, what: str) -> Tensor:
    check_finite(out, f"{what} (f or its derivatives are not finite at x?)")
    return out


def _check_mode(mode: str) -> str:
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
    return mode


def hvp(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, *, mode: str | None = None) -> Tensor:
    r"""Hessian-vector product :math:`\nabla^2 f(x)\, v` by automatic differentiation.

    Args:
        f: a function of one tensor returning a scalar tensor.
        x: the point; ``x`` is not modified.
        v: the direction, shaped like ``x``.
        mode: ``"forward-over-reverse"`` (``jvp`` of ``grad``) or ``"reverse-over-reverse"``
            (``vjp`` of ``grad``); ``None`` takes :data:`DEFAULT_HVP_MODE`.

    Returns:
        A tensor shaped like ``x``.

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> hvp(lambda x: (x**3).sum(), x, torch.tensor([1.0, 0.0]))
        tensor([6., 0.])
    """
    x = _check_point(x)
    v = _check_direction(x, v)
    mode = _check_mode(mode or DEFAULT_HVP_MODE)
    if mode == "forward-over-reverse":
        with torch.enable_grad():
            return _finite(jvp(grad(_scalar_fn(f)), (x,), (v,))[1], "the Hessian-vector product")
    out = hvp_product(lambda xs: _scalar_fn(f)(xs[0]), (x,))((v.unsqueeze(0),))[0][0]
    return _finite(out, "the Hessian-vector product")


def linearize_hvp(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Tensor]:
    r"""Linearise the gradient of ``f`` at ``x`` once; return ``v -> \nabla^2 f(x) v``.

    The forward pass and the gradient's graph are built once and kept; each product is then
    one backward pass through that graph, which is what CG and Lanczos want when they ask
    for many products at one point. The returned function also accepts a batch of
    directions of shape ``(k, *x.shape)``. It holds the graph's memory until it is deleted.

    Example:
        >>> hv = linearize_hvp(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]))
        >>> hv(torch.tensor([0.0, 1.0]))
        tensor([ 0., 12.])
    """
    x = _check_point(x)
    apply = hvp_product(lambda xs: _scalar_fn(f)(xs[0]), (x,), reuse=True)

    def product(v: Tensor) -> Tensor:
        V, single = as_directions(x, v)
        out = _finite(apply((V,))[0], "the Hessian-vector product")
        return out[0] if single else out

    return product


def hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Dense Hessian of ``f`` at ``x``, of shape ``x.shape + x.shape``; for small problems.

    Example:
        >>> hessian(lambda x: (x**2).sum(), torch.zeros(2))
        tensor([[2., 0.],
                [0., 2.]])
    """
    x = _check_point(x)
    with torch.enable_grad():
        return _finite(torch.func.hessian(_scalar_fn(f))(x), "the Hessian")


def fd_step(dtype: torch.dtype) -> float:
    r"""Relative step of a central difference of gradients: :math:`\epsilon^{1/3}`.

    The truncation error of a central difference is :math:`O(h^2)` and the rounding error
    :math:`O(\epsilon / h)`; their sum is smallest at :math:`h \approx \epsilon^{1/3}`.
    """
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def fd_scale(x_norm: Tensor | float, v_norm: Tensor | float, dtype: torch.dtype) -> float:
    """The step ``h`` for the direction ``v`` at a point of norm ``x_norm``."""
    return fd_step(dtype) * (1.0 + float(x_norm)) / max(float(v_norm), 1e-300)


def fd_hvp(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    v: Tensor,
    *,
    h: float | None = None,
    grad_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""Central finite-difference Hessian-vector product.

    .. math:: \nabla^2 f(x) v \approx \frac{\nabla f(x + h v) - \nabla f(x - h v)}{2h}

    Only first derivatives are taken, so this works for functions whose second derivative
    autograd cannot give (fused attention kernels, custom ops with a backward only).

    Args:
        f: a function of one tensor returning a scalar tensor.
        x: the point.
        v: the direction, shaped like ``x``.
        h: the step; by default :func:`fd_scale` of the dtype (``eps ** (1/3)`` scaled by
            ``(1 + |x|) / |v|``).
        grad_fn: the gradient of ``f``, if known; by default ``torch.func.grad(f)``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> fd_hvp(lambda x: (x**3).sum(), x, torch.tensor([1.0, 0.0], dtype=torch.float64))
        tensor([6.0000, 0.0000], dtype=torch.float64)
    """
    x = _check_point(x)
    v = _check_direction(x, v)
    g = grad_fn if grad_fn is not None else grad(_scalar_fn(f))
    v_norm = torch.linalg.vector_norm(v)
    if float(v_norm) == 0.0:
        return torch.zeros_like(x)
    if h is None:
        h = fd_scale(torch.linalg.vector_norm(x), v_norm, x.dtype)
    elif not h > 0:
        raise ValueError(f"h must be a positive step, got {h}")
    with torch.enable_grad():
        out = (g(x + h * v) - g(x - h * v)) / (2.0 * h)
    return _finite(out, "the finite-difference Hessian-vector product")
