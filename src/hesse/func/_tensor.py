"""Second derivatives of a function of one tensor, ``f: Tensor -> scalar Tensor``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp

from hesse._core import check_finite, check_scalar
from hesse._core._checks import check_choice
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
    return check_choice(mode, "mode", HVP_MODES)


def _hvp_loss(f: Callable[[Tensor], Tensor]) -> Callable[[tuple[Tensor, ...]], Tensor]:
    """``f`` as the engine's loss of ``(x,)``. A value that does not depend on ``x`` at all
    (a constant, no graph to ``x``) has Hessian 0, as :func:`hessian` gives: a zero term
    ties it to ``x``, so that its products are zeros rather than an autograd error."""
    scalar = _scalar_fn(f)

    def loss(xs: tuple[Tensor, ...]) -> Tensor:
        out = scalar(xs[0])
        return out if out.requires_grad else out + 0.0 * xs[0].sum()

    return loss


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
    out = hvp_product(_hvp_loss(f), (x,))((v.unsqueeze(0),))[0][0]
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
    apply = hvp_product(_hvp_loss(f), (x,), reuse=True)

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
    # Forward over reverse, as torch.func.hessian, but on torch.func.grad rather than on
    # jacrev: in torch 2.13 jacfwd(jacrev(f)) gets the second derivative of layer_norm's
    # weight wrong (an asymmetric, wrong Hessian); jacfwd(grad(f)) does not.
    with torch.enable_grad():
        return _finite(torch.func.jacfwd(grad(_scalar_fn(f)))(x), "the Hessian")


class FiniteDifferenceWarning(UserWarning):
    """A finite-difference Hessian-vector product whose own error estimate is large: the
    gradient is not smooth at the scale of the step (ReLU-like kinks, max-pooling,
    clamping) or the step is lost in rounding. Use autograd's exact products
    (:func:`hesse.hvp`, :class:`hesse.HessianOperator`) where the model has a double
    backward; finite differences are only for custom ops without one."""


#: Estimated relative error above which a finite-difference product warns.
FD_WARN_RTOL = 1e-2


def fd_step(dtype: torch.dtype) -> float:
    r"""Relative step :math:`\eta` of a finite-difference Hessian-vector product:
    :math:`\epsilon^{1/3} / 2` (2.5e-3 in float32, 3e-6 in float64).

    The product is a Richardson extrapolation of central differences at the steps
    :math:`\eta` and :math:`\eta / 2` (see :func:`fd_hvp`). The central difference at the
    smaller step has truncation error :math:`O(\eta^2)` and rounding error
    :math:`O(\epsilon / \eta)`, balanced near :math:`\eta \approx \epsilon^{1/3}`; its
    distance to the other difference is the reported error estimate, so the step is set
    where that estimate is tight, and the extrapolated product is then more accurate
    still. The factor 1/2 was measured on small transformers and an LSTM in float32
    (``tests/test_finite_differences.py``).
    """
    return 0.5 * float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def fd_scale(params: Sequence[Tensor], cols: Sequence[Tensor]) -> list[float]:
    r"""The length :math:`t_j` of each direction such that the step :math:`\eta t_j v_j`
    moves the coordinates it touches by about :math:`\eta` times their typical magnitude.

    ``params`` are tensors (the parameters, or the one tensor ``x``) and ``cols`` the
    directions, one tensor ``(k, *p.shape)`` per parameter. Each tensor :math:`T` has a
    typical magnitude :math:`s_T`, its root mean square, but no less than a quarter of
    the root mean square of all the parameters (a fresh bias is zero and has no scale of
    its own; 1 if all are zero). The typical magnitude along :math:`v` and the typical
    size of the coordinates of :math:`v` (both weighted by :math:`v_i^2`, so that the
    coordinates :math:`v` lives on count) are

    .. math:: s(v) = \frac{\| s \odot v \|_2}{\|v\|_2}, \qquad
              u(v) = \frac{\|v\|_4^2}{\|v\|_2}, \qquad t = \frac{s(v)}{u(v)}
              = \frac{\| s \odot v\|_2}{\|v\|_4^2}.

    A random direction then moves every coordinate by about :math:`\eta` of its tensor's
    magnitude (:math:`t \|v\| \approx \|\theta\|`); an eigenvector concentrated on one
    layer moves that layer by the same relative amount, not by :math:`\eta \|\theta\|`,
    which grows with the model and crossed the nonlinearities of a transformer. A zero
    direction has length 0.
    """
    acc = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    rms = torch.stack(
        [
            torch.linalg.vector_norm(p.detach(), dtype=acc) / math.sqrt(max(p.numel(), 1))
            for p in params
        ]
    )
    sizes = torch.tensor([float(p.numel()) for p in params], dtype=acc, device=rms.device)
    rms_all = float(((rms**2 * sizes).sum() / sizes.sum().clamp_min(1.0)).sqrt())
    scale = rms.clamp_min(rms_all / 4.0 if rms_all > 0 else 1.0)
    k = cols[0].shape[0]
    flat = [c.detach().reshape(k, -1).to(acc) for c in cols]
    # t is homogeneous of degree -1 in v: work with v / max|v| (v**4 cannot overflow)
    top = torch.stack([f.abs().amax(1) if f.shape[1] else f.new_zeros(k) for f in flat], 1)
    top = top.amax(1)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    flat = [f / safe[:, None] for f in flat]
    sq = torch.stack([(f * f).sum(1) for f in flat], 1)  # (k, T): |v_T|^2
    quart = torch.stack([(f * f).square().sum(1) for f in flat], 1).sum(1)
    t = (sq * scale**2).sum(1).sqrt() / quart.clamp_min(torch.finfo(acc).tiny).sqrt() / safe
    return torch.where(top > 0, t, torch.zeros_like(t)).tolist()


def fd_richardson(
    grad_at: Callable[[float], Sequence[Tensor]], h: float
) -> tuple[list[Tensor], list[Tensor]]:
    r"""Richardson extrapolation of two central differences of a gradient.

    ``grad_at(s)`` is the gradient at :math:`x + s v` (a sequence of tensors). With
    :math:`D(h) = (\nabla f(x + h v) - \nabla f(x - h v)) / 2h = H v + c h^2 + O(h^4)`,
    returns the product :math:`(4 D(h/2) - D(h)) / 3 = H v + O(h^4)` and the difference
    :math:`\Delta = D(h/2) - D(h)`, whose norm is the error estimate. Four gradients.
    """
    plus, minus = grad_at(h), grad_at(-h)
    wide = [(a - b) / (2.0 * h) for a, b in zip(plus, minus)]
    del plus, minus
    plus, minus = grad_at(h / 2), grad_at(-h / 2)
    narrow = [(a - b) / h for a, b in zip(plus, minus)]
    delta = [n - w for n, w in zip(narrow, wide)]
    return [n + d / 3.0 for n, d in zip(narrow, delta)], delta


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


class FDErrorTracker:
    r"""The error record of a sequence of finite-difference products, and the warning.

    ``rtol`` is the largest :math:`\|\Delta_j\| / (\hat A \|v_j\|)` so far, with
    :math:`\hat A = \max_j \|(Hv)_j\| / \|v_j\|` over the products so far (a lower bound
    on the norm of the operator): the relative accuracy of a product in the sense of
    :attr:`hesse.operators.CurvatureOperator.product_rtol`, without a false alarm for a
    direction of small curvature. ``last_error`` is the estimate of each column of the
    latest product relative to that column, :math:`\|\Delta_j\| / \|(Hv)_j\|`. The first
    time ``rtol`` exceeds ``warn_rtol``, a :class:`FiniteDifferenceWarning` is issued.
    """

    def __init__(self, who: str, warn_rtol: float = FD_WARN_RTOL):
        self.who, self.warn_rtol = who, warn_rtol
        self.rtol = 0.0
        self.norm = 0.0
        self.last_error: list[float] = []
        self.warned = False

    def record(self, out: Tensor, delta: Tensor, V: Tensor, stacklevel: int = 2) -> None:
        """Record a product ``out`` of the columns of ``V`` (all ``(n, k)``) and ``delta``."""
        n_out = torch.linalg.vector_norm(out.double(), dim=0).tolist()
        n_delta = torch.linalg.vector_norm(delta.double(), dim=0).tolist()
        n_v = torch.linalg.vector_norm(V.double(), dim=0).tolist()
        self.last_error = [_ratio(d, o) for d, o in zip(n_delta, n_out)]
        for o, v in zip(n_out, n_v):
            if v > 0 and math.isfinite(o):
                self.norm = max(self.norm, o / v)
        for d, v in zip(n_delta, n_v):
            if v > 0:
                self.rtol = max(self.rtol, _ratio(d, self.norm * v))
        if self.rtol > self.warn_rtol and not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.who}: a Hessian-vector product by finite differences has an "
                f"estimated relative error of {self.rtol:.1e} (two central differences, "
                "at steps h and h/2, disagree): the gradient is not smooth at the scale of "
                "the step (ReLU-like kinks, max-pooling, clamping) or the step is lost in "
                "rounding, and the products are not to be trusted to better than this. "
                "Use autograd's exact products (hesse.HessianOperator, hesse.hvp), which "
                "work for any model with a double backward; finite differences are only "
                "for custom ops without one.",
                FiniteDifferenceWarning,
                stacklevel=stacklevel + 1,
            )


def fd_hvp(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    v: Tensor,
    *,
    h: float | None = None,
    grad_fn: Callable[[Tensor], Tensor] | None = None,
    return_error: bool = False,
) -> Tensor | tuple[Tensor, float]:
    r"""Finite-difference Hessian-vector product: Richardson extrapolation of two central
    differences of the gradient.

    .. math::
        D(h) = \frac{\nabla f(x + h v) - \nabla f(x - h v)}{2h}
             = \nabla^2 f(x) v + c\, h^2 + O(h^4), \qquad
        \nabla^2 f(x) v \approx \frac{4 D(h/2) - D(h)}{3} + O(h^4),

    with the error estimate :math:`\|D(h/2) - D(h)\| / \|\text{result}\|` (three
    quarters of the truncation error of :math:`D(h)`, three times that of
    :math:`D(h/2)`; as ``scipy.differentiate.derivative``, the difference of the last two
    approximations). Four gradients per product instead of two, for an error that is
    measured rather than assumed (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
    §8.1, and Richardson extrapolation, e.g. Press et al., *Numerical Recipes*, §5.7).

    Only first derivatives are taken, so this works for functions whose second derivative
    autograd cannot give (custom ops with a backward only).

    Accuracy: for a smooth ``f`` the product is typically within 1e-4 (float32) and 1e-9
    (float64) of the exact one, relative, and the estimate is an upper bound up to a
    factor about 1.5 where rounding dominates (measured on small transformers and an LSTM;
    tests/test_finite_differences.py). Where the gradient has kinks within the step (ReLU)
    the product can be wrong by more than 100%; the estimate then is large too, and a
    :class:`FiniteDifferenceWarning` is issued when it exceeds 1e-2 (unless
    ``return_error``).

    Args:
        f: a function of one tensor returning a scalar tensor.
        x: the point.
        v: the direction, shaped like ``x``.
        h: the step of the outer difference; by default :func:`fd_step` of the dtype times
            :func:`fd_scale` (a step that moves ``x`` by about ``eps ** (1/3) / 2`` of its
            root mean square).
        grad_fn: the gradient of ``f``, if known; by default ``torch.func.grad(f)``. It
            must return a tensor of the shape, dtype and device of ``x`` (checked).
        return_error: also return the estimated relative error (a float).

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> fd_hvp(lambda x: (x**3).sum(), x, torch.tensor([1.0, 0.0], dtype=torch.float64))
        tensor([6.0000, 0.0000], dtype=torch.float64)
    """
    x = _check_point(x)
    v = _check_direction(x, v)
    if grad_fn is None:
        g = grad(_scalar_fn(f))
    else:
        # A user's gradient is checked at every call: a wrong shape would broadcast in the
        # differences (a (1,)-shaped or 0-d result, a silently wrong product).
        def g(z: Tensor) -> Tensor:
            out = grad_fn(z)
            want = f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device} (like x)"
            if not isinstance(out, Tensor):
                raise TypeError(f"grad_fn(x) must return {want}, got {type(out).__name__}")
            if out.shape != x.shape:
                raise ValueError(f"grad_fn(x) must return {want}, got shape {tuple(out.shape)}")
            if out.dtype != x.dtype or out.device != x.device:
                raise TypeError(f"grad_fn(x) must return {want}, got {out.dtype} on {out.device}")
            return out

    if h is None:
        h = fd_step(x.dtype) * fd_scale([x], [v.unsqueeze(0)])[0]
        if h == 0.0:  # v == 0
            return (torch.zeros_like(x), 0.0) if return_error else torch.zeros_like(x)
    elif not h > 0:
        raise ValueError(f"h must be a positive step, got {h}")
    with torch.enable_grad():
        (out,), (delta,) = fd_richardson(lambda s: [g(x + s * v)], h)
    out = _finite(out, "the finite-difference Hessian-vector product")
    err = _ratio(float(torch.linalg.vector_norm(delta)), float(torch.linalg.vector_norm(out)))
    if return_error:
        return out, err
    if err > FD_WARN_RTOL:
        FDErrorTracker("hesse.fd_hvp").record(
            out.reshape(-1, 1), delta.reshape(-1, 1), v.reshape(-1, 1), stacklevel=2
        )
    return out
