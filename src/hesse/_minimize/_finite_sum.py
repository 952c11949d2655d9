r"""Finite sums for :func:`hesse.minimize`: an objective given as data plus a per-batch
loss, so that methods which subsample the data (``"subsampled-newton"``) can see the
samples, and a loop that drives :mod:`hesse.solvers`' subsampled Newton pieces (the same
ones :class:`hesse.optim.SubsampledNewton` takes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hesse._core import check_scalar
from hesse._core._checks import check_int, check_seed
from hesse._core._status import Status
from hesse._minimize._loops import _stationary
from hesse._minimize._objective import Objective
from hesse._minimize._run import Run, Stop
from hesse.func._engine import flat_graph_hvp
from hesse.func._io import first_tensor, map_tensors
from hesse.solvers import NewtonDescent, lm_damping, search_iteration, subsample_size
from hesse.solvers._subsample import (
    ARMIJO_C1,
    dense_newton_direction,
    dense_subsample_count,
    subsample_indices,
)

REDUCTIONS = ("mean", "sum")


class FiniteSum:
    r"""An objective that is a loss over data, for :func:`hesse.minimize`:

    .. math:: f(x) = \ell(x, D) + r(x), \qquad \ell(x, D) = \frac{1}{n} \sum_{i=1}^n
        \ell_i(x) \ \ (\text{or } \textstyle\sum_i \ell_i(x) \text{ with }
        ``reduction="sum"``),

    with :math:`D` the ``data`` (``n`` samples) and :math:`r` an optional ``regularizer``.

    A ``FiniteSum`` is a callable: ``fs(x)`` is :math:`f(x)` on all the data, so every
    method of :func:`hesse.minimize` takes it as ``fun`` and minimises the full objective.
    What it adds is access to the samples: ``method="subsampled-newton"`` forms the
    curvature of :math:`\ell(\cdot, S) + r` on a subsample :math:`S` (rescaled by
    :math:`n/|S|` for a sum) while the value, the gradient and the stopping tests are the
    full objective's, so the run reaches the full-data minimiser, not a subsample's. On
    tall data it starts from a warm start on nested samples growing tenfold (option
    ``gradient_sample``), each minimised only until its gradient is within its sampling
    noise, which the loop over all the data then refines (the samples' evaluations are not
    counted in ``nfev``).

    Args:
        loss: ``loss(x, batch) -> scalar tensor``: the loss on a batch of samples, shaped
            like ``data`` (the same call on all the data is the objective), a mean over the
            batch's samples (``reduction="mean"``, torch's losses by default) or their sum.
            Differentiable twice by autograd in ``x``.
        data: the samples: a tensor, or a tuple, list or dict of tensors; every tensor
            whose first dimension has the size of the first tensor's holds one sample per
            row there (and is subsampled along it), any other entry is passed as it is.
        regularizer: ``r(x) -> scalar tensor`` added to the loss, never subsampled (e.g.
            an L2 penalty).
        reduction: ``"mean"`` (default) or ``"sum"``: how ``loss`` combines samples.
        hessian: optional ``hessian(x, batch) -> (P, P) tensor``, the Hessian of
            ``loss(., batch)`` at ``x`` (flat, ``P`` unknowns) where there is a faster way
            than autograd's (a closed form: :meth:`hesse.problems.Problem.objective` gives
            :math:`X^\top \operatorname{diag}(h) X` for a linear model). By default all
            ``P`` columns come from one batched backward pass through the gradient's graph.
            Every method that forms the dense Hessian (``"newton"``, ``"trust-exact"``,
            the saddle check, ``"subsampled-newton"``) uses it.
        batch_size: evaluate the value and the gradient (and Hessian-vector products) over
            the data in chunks of this many samples, each chunk's graph freed after its
            backward pass, so that memory holds one chunk's graph rather than all the
            data's, and the second pass over a chunk finds it in the cache (often faster
            for tall data). The result is the same to rounding: ``loss`` must be a mean
            (or sum) over independent samples, as subsampling already assumes. ``None``
            (default): all the data in one call.

    Example:
        >>> X = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> fs = FiniteSum(lambda w, b: ((b[0] @ w - b[1]) ** 2).mean(), (X, y))
        >>> fs.samples
        200
        >>> from hesse import minimize
        >>> r = minimize(fs, torch.zeros(3, dtype=torch.float64), "subsampled-newton")
        >>> r.success, r.x.round(decimals=4).tolist()
        (True, [1.0, -2.0, 0.5])
    """

    def __init__(
        self,
        loss: Callable[[Tensor, Any], Tensor],
        data: Any,
        *,
        regularizer: Callable[[Tensor], Tensor] | None = None,
        reduction: str = "mean",
        hessian: Callable[[Tensor, Any], Tensor] | None = None,
        batch_size: int | None = None,
    ):
        if not callable(loss):
            raise TypeError(
                f"loss must be callable (loss(x, batch) -> scalar tensor), got "
                f"{type(loss).__name__}"
            )
        if regularizer is not None and not callable(regularizer):
            raise TypeError(
                f"regularizer must be callable (x -> scalar tensor) or None, got "
                f"{type(regularizer).__name__}"
            )
        if hessian is not None and not callable(hessian):
            raise TypeError(
                f"hessian must be callable (hessian(x, batch) -> (P, P) tensor) or None, got "
                f"{type(hessian).__name__}"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        first = first_tensor(data)
        if first is None:
            raise TypeError(
                "data must be a tensor, or a tuple, list or dict of tensors with one sample "
                f"per row, got {type(data).__name__} without a tensor"
            )
        if first.dim() == 0 or first.shape[0] == 0:
            raise ValueError(
                "data must hold at least one sample along the first dimension of its first "
                f"tensor, got a tensor of shape {tuple(first.shape)}"
            )
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size")
        self.loss, self.data, self.regularizer = loss, data, regularizer
        self.reduction, self.hessian = reduction, hessian
        self.samples = int(first.shape[0])
        self.batch_size = batch_size
        # which tensors of data hold one sample per row: decided once, here, so that a
        # tensor passed as it is never gets indexed where its first dimension happens to
        # equal a chunk's or a subsample's size
        self._per_sample = _per_sample_leaves(data, self.samples)

    @property
    def chunked(self) -> bool:
        """Whether evaluations run over the data in chunks of ``batch_size`` samples."""
        return self.batch_size is not None and self.batch_size < self.samples

    def chunks(self, batch: Any = None, scale: float = 1.0):
        """``(chunk, weight)`` for each run of ``batch_size`` consecutive samples of
        ``batch`` (all the data by default): ``weight`` is the chunk's share of ``scale``
        times the loss on ``batch`` (its fraction of the batch's samples for a mean,
        ``scale`` for a sum)."""
        batch = self.data if batch is None else batch
        n = int(first_tensor(batch).shape[0])
        b = self.batch_size or n
        for start in range(0, n, b):
            stop = min(n, start + b)
            chunk = self._take(batch, slice(start, stop))
            yield chunk, scale * ((stop - start) / n if self.reduction == "mean" else 1.0)

    def _parts(self, batch: Any = None, scale: float = 1.0):
        """The chunks with their weights, then ``(None, 1.0)`` for the regulariser."""
        yield from self.chunks(batch, scale)
        if self.regularizer is not None:
            yield None, 1.0

    def _part_value(self, x: Tensor, batch: Any, weight: float) -> Tensor:
        if batch is None:
            return check_scalar(self.regularizer(x), "regularizer(x)")
        value = check_scalar(self.loss(x, batch), "loss(x, batch)")
        return value * weight if weight != 1.0 else value

    def _value_and_grad(self, x: Tensor, shape, parts=None) -> tuple[Tensor, Tensor | None, bool]:
        """``f`` and its flat gradient at the flat ``x`` (``shape``: the user's), chunk by
        chunk with no graph kept, and whether any chunk's value depends on ``x`` through
        autograd; the gradient is ``None`` where the value is not finite (the rest of the
        data is then not evaluated). ``parts``: ``(batch, weight)`` pairs to sum instead of
        :meth:`_parts` (a ``None`` batch is the regulariser)."""
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        g = torch.zeros_like(x)
        reached = False
        with torch.enable_grad():
            xl = x.detach().requires_grad_()
            for batch, weight in self._parts() if parts is None else parts:
                value = self._part_value(xl.view(shape), batch, weight)
                total = total + value.detach()
                if not bool(torch.isfinite(value.detach())):
                    return total, None, reached
                if value.requires_grad:
                    (gc,) = torch.autograd.grad(value, xl, allow_unused=True)
                    if gc is not None:
                        g += gc
                        reached = True
        return total, g, reached

    def _hvp(self, x: Tensor, shape, V: Tensor, batch: Any = None, scale: float = 1.0) -> Tensor:
        """The Hessian of ``f`` (of ``scale * loss(., batch) + regularizer`` with ``batch``)
        at the flat ``x`` times ``V`` (``(P,)`` or ``(P, k)``), chunk by chunk: each
        chunk's gradient graph is built, differentiated (all columns in one batched pass)
        and freed."""
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for part, weight in self._parts(batch, scale):
                xl = x.detach().requires_grad_()
                value = self._part_value(xl.view(shape), part, weight)
                if not value.requires_grad:
                    continue
                (g,) = torch.autograd.grad(value, xl, create_graph=True, allow_unused=True)
                if g is not None and g.requires_grad:
                    out += flat_graph_hvp(g, xl, V, retain=False)
        return out

    def _dense_hessian(
        self, x: Tensor, shape, batch: Any = None, scale: float = 1.0
    ) -> Tensor | None:
        """The dense Hessian of ``scale * loss(., batch) + regularizer`` at the flat ``x``
        (``batch``: all the data by default), symmetrised; ``None`` where it is not finite.
        From ``hessian`` (plus the regulariser's by autograd) where given; else chunk by
        chunk where ``batch`` holds more than ``batch_size`` samples; else all the columns
        in one batched backward pass through the gradient's graph."""
        batch = self.data if batch is None else batch
        P = x.numel()
        if self.hessian is not None:
            H = self.hessian(x.view(shape), batch)
            if not isinstance(H, Tensor) or H.shape != (P, P):
                got = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
                raise ValueError(
                    f"the FiniteSum's hessian(x, batch) must return a ({P}, {P}) tensor, got {got}"
                )
            H = H.detach().to(x.dtype) * scale
            if self.regularizer is not None:
                R = _autograd_hessian(self.regularizer, x, shape)
                if R is None:
                    return None
                H = H + R
        elif self.batch_size is not None and len(first_tensor(batch)) > self.batch_size:
            H = self._hvp(x, shape, torch.eye(P, dtype=x.dtype, device=x.device), batch, scale)
        else:
            H = _autograd_hessian(lambda z: self.batch_value(z, batch, scale), x, shape)
            if H is None:
                return None
        H = 0.5 * (H + H.T)
        return H if bool(torch.isfinite(H).all()) else None

    def __call__(self, x: Tensor) -> Tensor:
        """:math:`f(x)` on all the data."""
        return self.batch_value(x, self.data)

    def batch_value(self, x: Tensor, batch: Any, scale: float = 1.0) -> Tensor:
        """``scale * loss(x, batch) + regularizer(x)``."""
        value = check_scalar(self.loss(x, batch), "loss(x, batch)")
        if scale != 1.0:
            value = value * scale
        if self.regularizer is not None:
            value = value + check_scalar(self.regularizer(x), "regularizer(x)")
        return value

    def subsample(self, idx: Tensor) -> Any:
        """The samples at positions ``idx`` (every tensor with the samples along its first
        dimension is indexed alike)."""
        return self._take(self.data, idx)

    def _take(self, batch: Any, rows: slice | Tensor) -> Any:
        """``rows`` of ``batch`` (``data`` or a part of it, shaped alike) in every tensor
        that holds the samples in ``data``; the others as they are."""
        flags = iter(self._per_sample)

        def take(t: Tensor) -> Tensor:
            if not next(flags):
                return t
            return t[rows] if isinstance(rows, slice) else t[rows.to(t.device)]

        return map_tensors(batch, take)

    def __repr__(self) -> str:
        reg = ", regularizer" if self.regularizer is not None else ""
        bs = f", batch_size={self.batch_size}" if self.batch_size is not None else ""
        return f"FiniteSum({self.samples} samples, reduction={self.reduction!r}{reg}{bs})"


def _per_sample_leaves(data: Any, n: int) -> tuple[bool, ...]:
    """For each tensor of ``data`` (in :func:`map_tensors`' order), whether it holds ``n``
    samples along its first dimension."""
    flags: list[bool] = []

    def mark(t: Tensor) -> Tensor:
        flags.append(t.dim() > 0 and t.shape[0] == n)
        return t

    map_tensors(data, mark)
    return tuple(flags)


#: Options of ``method="subsampled-newton"`` and their defaults (those of
#: :class:`hesse.optim.SubsampledNewton`).
SUBSAMPLED_OPTIONS: dict[str, Any] = {
    "subsample": 0.1,
    "subsample_growth": 0.5,
    "subsample_max": None,
    "gradient_sample": "auto",
    "precision": "full",
    "damping": 1e-3,
    "dense_max": 4096,
    "seed": 0,
}


def check_subsampled_options(out: dict[str, Any], n: int) -> None:
    """Validate the options of ``"subsampled-newton"`` in place (``n``: unknowns)."""
    for key in ("subsample", "subsample_max"):
        v = out[key]
        if v is None and key == "subsample_max":
            continue
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
            isinstance(v, float) and 0 < v <= 1
        )
        if not ok:
            none = ", or None" if key == "subsample_max" else ""
            raise ValueError(
                f"{key} must be a number of samples (int >= 1) or a fraction in (0, 1]{none}, "
                f"got {v!r}"
            )
    for key in ("subsample_growth", "damping"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
        out[key] = float(v)
    v = out["dense_max"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"dense_max must be a positive integer, got {v!r}")
    if n > v:
        raise ValueError(
            f"method 'subsampled-newton' forms the subsampled Hessian densely and x0 has {n} "
            f"unknowns, more than dense_max={v}: raise options['dense_max'] if {n}x{n} "
            "matrices fit, or use 'newton-cg' / 'trust-ncg' (Hessian-vector products), or "
            "hesse.optim.SubsampledNewton (CG on subsampled products) for a model"
        )
    out["seed"] = check_seed(out["seed"], allow_none=False)
    from hesse._minimize._growing_sample import check_gradient_sample
    from hesse._minimize._precision import check_precision

    check_gradient_sample(out["gradient_sample"])
    check_precision(out["precision"])


def _count(v: int | float, n: int) -> int:
    return v if isinstance(v, int) else max(1, round(v * n))


def subsampled_newton_loop(run: Run, fs: FiniteSum, x0: Tensor, options: dict) -> None:
    r"""Subsampled Newton (Byrd, Chin, Neveitt & Nocedal 2011; Roosta-Khorasani & Mahoney
    2019) on a :class:`FiniteSum`: the full gradient :math:`g`, the dense Hessian
    :math:`H_S` of the loss on a subsample :math:`S` (plus the regulariser's), the damped
    direction :math:`-(H_S + \mu I)^{-1} g`, a backtracking search on the full objective,
    :math:`\mu` adapted by the reduction ratio (Nielsen), and a subsample that grows as
    the gradient shrinks. Iteration ``k`` draws its subsample with the seed
    ``derive_seed(seed, "subsample", k)``, as :class:`hesse.optim.SubsampledNewton`'s
    ``k``-th step does. On tall data it starts from the phases on growing samples of
    :mod:`hesse._minimize._growing_sample` (``gradient_sample``), each this same loop on
    a :class:`~hesse._minimize._growing_sample.SampleSum`."""
    from hesse._minimize._growing_sample import sample_phases  # they build on this module
    from hesse._minimize._precision import LOWER, lower_precision_start

    obj = run.obj
    n = fs.samples
    base = dense_subsample_count(options["subsample"], n, x0.numel())
    cap = n if options["subsample_max"] is None else min(n, _count(options["subsample_max"], n))
    growth, seed = options["subsample_growth"], options["seed"]
    scale = 1.0
    run.damping = options["damping"]

    def warm_start(x: Tensor) -> Tensor:
        if options["precision"] == "mixed" and x.dtype in LOWER:  # all of it in float32 first
            out = lower_precision_start(run, fs, x, options, subsampled_newton_loop)
            if out is not x:
                return out
        return sample_phases(run, fs, x, options, subsampled_newton_loop, base, cap)

    pt, warm = _first_point(run, x0, warm_start)
    damping, nu = (run.damping if warm else options["damping"]), 2.0  # the phases' last
    carried = run.curvature if warm else None  # the float32 stage's last curvature
    # the subsample's growth goes on from where the float32 stage had it
    g0 = run.schedule_g0 if warm and run.schedule_g0 is not None else pt.g_norm(2)
    run.schedule_g0 = g0
    step = 0
    while True:
        if run.converged(pt):
            nxt = _stationary(run, pt, False)
            if nxt is None:
                raise Stop(Status.CONVERGED, "the gradient norm is below the tolerance")
            pt = nxt
            continue
        g = pt.g
        if carried is not None:  # formed a step before this point, on the same data
            H, carried = carried, None
        else:
            k = min(max(base, subsample_size(base, cap, pt.g_norm(2), g0, growth)), n)
            if k >= n:
                batch, scale = None, 1.0  # all the data (in chunks where fs has a batch_size)
            else:
                batch = fs.subsample(subsample_indices(n, k, seed, step))
                scale = n / k if fs.reduction == "sum" else 1.0
            H = run.curvature = _subsample_hessian(obj, fs, pt.x, batch, scale)
        step += 1
        if H is None:  # not finite on this subsample: stay, damp harder, draw again
            damping = max(damping, 1e-8) * 10.0  # as optim.SubsampledNewton skips
            run.damping = damping
            run.nit += 1
            run.check_budget()
            continue
        d, q = dense_newton_direction(H, g, damping)
        descent = NewtonDescent(d, q, lambda v, H=H: H @ v)
        it = search_iteration(pt, descent, run.evaluate, "armijo", c1=ARMIJO_C1, retry=False)
        if damping > 0 and descent.informative(pt, it):
            damping, nu = lm_damping(damping, nu, descent.ratio(pt, it))
            run.damping = damping
        if it.accepted:
            old, pt = pt, it.point
            run.after_step(old, pt, it.step_norm)
            continue
        run.nit += 1
        run.check_budget()
        if not run.retry_rejected:
            raise Stop(Status.NO_PROGRESS, f"a step was rejected: {it.search.message}")
        if not math.isfinite(damping) or damping > 1e30:
            raise Stop(
                Status.NO_PROGRESS,
                f"the line search failed and the damping grew without bound: {it.search.message}",
            )
        if damping == 0:
            raise Stop(Status.NO_PROGRESS, f"the line search failed: {it.search.message}")


def _first_point(run: Run, x0: Tensor, warm_start):
    """The loop's first point over all the data and whether it is the warm start's:
    ``warm_start(x0)`` (the phases on growing samples), or ``x0`` where that is not finite.
    ``x0`` is evaluated over all the data first only where a test needs it: a
    ``grad_rtol`` (relative to the gradient there); a start that passes the gradient test
    then stays, and so does one where ``f`` is lower than at the warm start's point."""
    start = None
    if run.tol.grad_rtol > 0:
        start = run.first(x0, False)
        run.record(start)
        if run.converged(start):
            return start, False
    x = warm_start(x0)
    pt = run.evaluate(x) if x is not x0 else None
    if pt is None or not pt.finite or (start is not None and start.f <= pt.f):
        if start is not None:
            run.current = start
            return start, False
        pt = run.first(x0, False)
        run.record(pt)
        return pt, False
    if start is None:
        run.first_point(pt)
    else:
        run.current = pt
    run.record(pt)
    return pt, True


def _subsample_hessian(obj: Objective, fs: FiniteSum, x: Tensor, batch: Any, scale: float):
    """:meth:`FiniteSum._dense_hessian` on ``batch``, counted as one Hessian."""
    obj.counts.nhev += 1
    return fs._dense_hessian(x, obj.shape, batch, scale)


def _autograd_hessian(fun, x: Tensor, shape) -> Tensor | None:
    sub = Objective(fun, x.view(shape))
    pt = sub.evaluate(x, graph=True)
    if not pt.finite or pt.hvp is None:
        return None
    return sub.hessian(pt)
