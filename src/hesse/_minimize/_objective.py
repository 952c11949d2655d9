"""The function being minimised: evaluations of ``f``, its gradient and its curvature at a
point, counted."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hesse._core import all_finite, check_scalar
from hesse.func import fd_step
from hesse.func._context import second_order
from hesse.func._engine import flat_graph_hvp
from hesse.func._tensor import FDErrorTracker, fd_richardson, fd_scale
from hesse.operators import CurvatureOperator
from hesse.solvers._point import Point

_NO_PATH = (
    "fun(x) does not depend on x through autograd: its value has no gradient path back to "
    "x (was x detached, converted to numpy or a Python number, or used only through "
    "non-differentiable operations such as argmax or round?). Keep fun in torch operations "
    "on x, or pass grad=; if fun is constant there is nothing to minimise"
)


class Counts:
    def __init__(self):
        self.nfev = self.njev = self.nhvp = self.nhev = 0


class Objective:
    """``fun`` of a tensor shaped like ``x0``, seen as a function of flat vectors.

    Derivatives come from autograd unless the user gave ``grad`` (then a Hessian-vector
    product, if not given as ``hvp``, is a Richardson extrapolation of two central differences
    of ``grad``, at four gradient evaluations per product: :func:`hesse.fd_hvp`).
    """

    def __init__(self, fun, x0: Tensor, grad=None, hvp=None):
        self.fun, self.user_grad, self.user_hvp = fun, grad, hvp
        self.shape = x0.shape
        self.n = x0.numel()
        self.dtype, self.device = x0.dtype, x0.device
        self.counts = Counts()
        from hesse._minimize._finite_sum import FiniteSum  # it builds on this module

        # A FiniteSum differentiated by autograd: evaluated chunk by chunk when it has a
        # batch_size, and its closed-form Hessian (if any) gives the dense Hessian.
        self.finite_sum = fun if isinstance(fun, FiniteSum) and grad is None else None
        # Whether fun's graph has been seen to reach x: checked at the first autograd
        # evaluation only (later points may legitimately sit on a flat piece of fun).
        self._reaches_x = False

    def _shaped(self, x: Tensor) -> Tensor:
        return x.view(self.shape)

    def _check_grad(self, g: object) -> Tensor:
        if not isinstance(g, Tensor) or g.numel() != self.n:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(
                f"grad(x) must return a tensor shaped like x0 {tuple(self.shape)}, got {got}"
            )
        return g.detach().reshape(-1).to(self.dtype)

    def evaluate(self, x: Tensor, graph: bool = False) -> Point:
        """``f`` and its gradient at ``x``; with ``graph`` the gradient's graph is kept for
        Hessian-vector products at ``x`` (cheaper than building it again)."""
        c = self.counts
        c.nfev += 1
        if self.user_grad is not None:
            with torch.no_grad():
                value = check_scalar(self.fun(self._shaped(x)), "fun(x)").detach()
            pt = Point(x, float(value), value)
            if math.isfinite(pt.f):
                c.njev += 1
                g = self._check_grad(self.user_grad(self._shaped(x)))
                if all_finite(g):
                    pt.g = g
                    pt.hvp = self._user_hvp(x, g)
            return pt
        fs = self.finite_sum
        if fs is not None and fs.chunked and self.user_hvp is None:
            return self._evaluate_chunked(fs, x, graph)
        with torch.enable_grad():
            xl = x.detach().requires_grad_()
            with second_order():  # its graph may be differentiated twice
                value = check_scalar(self.fun(self._shaped(xl)), "fun(x)")
            detached = value.detach()
            pt = Point(x, float(detached), detached)
            if not math.isfinite(pt.f):
                return pt
            c.njev += 1
            g = None
            if value.requires_grad:
                (g,) = torch.autograd.grad(value, xl, create_graph=graph, allow_unused=True)
            if g is None:  # no autograd path from x to fun(x) here
                if not self._reaches_x:
                    raise ValueError(_NO_PATH)
                g = torch.zeros_like(x)  # a flat piece of fun, away from the start
            self._reaches_x = True
        if not all_finite(g.detach()):
            return pt
        pt.g = g.detach()
        if self.user_hvp is not None:
            pt.hvp = self._user_hvp(x, pt.g)
        elif graph:
            pt.hvp = self._graph_hvp(xl, g)
        return pt

    @property
    def closed_form_hessian(self) -> bool:
        """Whether :meth:`hessian` comes from a FiniteSum's ``hessian=`` (no autograd)."""
        fs = self.finite_sum
        return fs is not None and fs.hessian is not None and self.user_hvp is None

    def _evaluate_chunked(self, fs, x: Tensor, graph: bool) -> Point:
        """A FiniteSum with a ``batch_size``: value and gradient chunk by chunk; products
        (``graph``) recompute each chunk's gradient graph instead of keeping all of them."""
        value, g, reached = fs._value_and_grad(x, self.shape)
        pt = Point(x, float(value), value)
        if not math.isfinite(pt.f) or g is None:
            return pt
        self.counts.njev += 1
        if not (reached or self._reaches_x):
            raise ValueError(_NO_PATH)
        self._reaches_x = True
        if not all_finite(g):
            return pt
        pt.g = g
        if graph:
            counts, shape = self.counts, self.shape

            def hvp(V: Tensor) -> Tensor:
                counts.nhvp += 1 if V.dim() == 1 else V.shape[1]
                return fs._hvp(x, shape, V)

            pt.hvp = hvp
        return pt

    def _graph_hvp(self, xl: Tensor, g: Tensor) -> Callable[[Tensor], Tensor]:
        counts = self.counts

        def hvp(V: Tensor) -> Tensor:  # V: (n,) or (n, k)
            k = 1 if V.dim() == 1 else V.shape[1]
            counts.nhvp += k
            return flat_graph_hvp(g, xl, V)

        return hvp

    def _user_hvp(self, x: Tensor, g: Tensor) -> Callable[[Tensor], Tensor]:
        counts = self.counts
        if self.user_hvp is not None:

            def hvp(V: Tensor) -> Tensor:
                cols = [V] if V.dim() == 1 else list(V.T)
                counts.nhvp += len(cols)
                out = [
                    self._check_grad(self.user_hvp(self._shaped(x), self._shaped(v))) for v in cols
                ]
                return out[0] if V.dim() == 1 else torch.stack(out, dim=1)

            return hvp
        if self.user_grad is None:
            return None  # autograd: built with the graph instead

        if not hasattr(self, "_fd_errors"):  # one record (and one warning) per minimisation
            self._fd_errors = FDErrorTracker("hesse.minimize (products by differences of grad)")
        errors = self._fd_errors

        def fd(V: Tensor) -> Tensor:
            cols = [V] if V.dim() == 1 else list(V.T)
            counts.nhvp += len(cols)
            out, deltas = [], []
            for v in cols:
                h = fd_step(x.dtype) * fd_scale([x], [v.unsqueeze(0)])[0]
                if h == 0:
                    out.append(torch.zeros_like(v))
                    deltas.append(torch.zeros_like(v))
                    continue
                counts.njev += 4
                (hv,), (delta,) = fd_richardson(
                    lambda s, v=v: [self._check_grad(self.user_grad(self._shaped(x + s * v)))], h
                )
                out.append(hv)
                deltas.append(delta)
            errors.record(torch.stack(out, 1), torch.stack(deltas, 1), torch.stack(cols, 1))
            return out[0] if V.dim() == 1 else torch.stack(out, dim=1)

        return fd

    def hessian(self, pt: Point) -> Tensor:
        """The dense Hessian at ``pt`` (which must carry ``hvp``), symmetrised; a
        FiniteSum's own ``hessian`` (a closed form) where it has one."""
        fs = self.finite_sum
        if self.closed_form_hessian or (fs is not None and fs.chunked and self.user_hvp is None):
            H = fs._dense_hessian(pt.x, self.shape)
            self.counts.nhev += 1
            if H is not None:
                return H
            return torch.full((self.n, self.n), math.nan, dtype=self.dtype, device=self.device)
        self.counts.nhev += 1
        before = self.counts.nhvp
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        H = pt.hvp(eye)
        self.counts.nhvp = before  # counted as one Hessian, not n products
        return 0.5 * (H + H.T)

    def operator(self, pt: Point) -> CurvatureOperator:
        """The Hessian at ``pt`` as a hesse operator (for CG and Lanczos)."""
        return pt.hessian()
