"""Truncated-Newton optimizers for models: HessianFree, SubsampledNewton, NewtonCG.

One loop serves the three (:class:`_TruncatedNewton`); they differ in where the curvature
comes from and in their defaults. The mathematics is :mod:`hesse.solvers`' (truncated CG,
Levenberg-Marquardt damping, the line searches) and :mod:`hesse.operators`' (GGN and
Hessian products on a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hesse._core import NonFiniteError
from hesse._core._checks import check_choice, check_seed, derive_seed
from hesse.func._io import ModelIO, take_samples
from hesse.func._model import ModelLoss
from hesse.func._output import OutputCurvature
from hesse.operators import GGNOperator, HessianOperator, IdentityOperator
from hesse.operators._dense import dense_model_curvature
from hesse.optim._base import (
    Closure,
    FlatOptimizer,
    GroupSetting,
    check_bool,
    check_int,
    check_real,
)
from hesse.solvers import (
    NewtonDescent,
    forcing_rtol,
    hutchinson_diagonal_probe,
    lm_damping,
    martens_damping,
    search_iteration,
    subsample_size,
    truncated_newton,
)
from hesse.solvers._subsample import (
    ARMIJO_C1,
    dense_newton_direction,
    dense_subsample_count,
    subsample_indices,
)

CURVATURES = ("hessian", "ggn")
SOLVERS = ("auto", "cholesky", "cg")

#: Columns of the identity per product where the dense curvature comes from an operator.
DENSE_COLUMNS = 128


def _check_subsample(value: object, name: str, *, none: str = "") -> int | float | None:
    """A number of samples (an int >= 1), a fraction of the batch in (0, 1], or None."""
    if value is None:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0 < value <= 1
    )
    if not ok:
        raise ValueError(
            f"{name} must be a number of samples (int >= 1) or a fraction in (0, 1]{none}, "
            f"got {value!r}"
        )
    return value


def _check_preconditioner(value: object, name: str) -> str | None:
    if value not in (None, "hutchinson"):
        raise ValueError(f"{name} must be None or 'hutchinson', got {value!r}")
    return value


def _check_seed(value: object, name: str) -> int:
    return check_seed(value, name, allow_none=False)


#: The settings of every truncated-Newton optimizer besides its hyper-parameters of the
#: step (lr, damping, CG's): one for the whole optimizer, kept in every parameter group
#: since hesse 0.1 (they were attributes, which state_dict() did not record).
_SETTINGS = (
    "curvature",
    "subsample",
    "subsample_growth",
    "subsample_max",
    "preconditioner",
    "l2",
    "seed",
    "solver",
    "dense_max",
    "max_iter",
    "tolerance_grad",
)


class _TruncatedNewton(FlatOptimizer):
    """The shared loop: evaluate the closure, build the curvature operator :math:`C`, solve
    :math:`(C + \\lambda I) p = -g` by CG, adapt :math:`\\lambda` by the reduction ratio,
    search along :math:`p`.

    Every setting is kept in the parameter groups (``state_dict()`` records it, and
    ``load_state_dict()`` restores it) and read as an attribute (``opt.subsample``); the
    model, its loss and its :class:`~hesse.ModelIO` are the optimizer's wiring, not
    settings, and stay attributes."""

    #: Defaults of subclasses.
    _backtrack_cg = False
    _line_search = "armijo"
    #: One Newton step for all parameters: a group may not set its own (it would be
    #: ignored); freeze the parameters that must not move instead (requires_grad=False).
    _global_settings = (
        "lr",
        "damping",
        "adapt_damping",
        "cg_max_iter",
        "cg_rtol",
        "warm_start",
        *_SETTINGS,
    )
    _late_settings = _SETTINGS
    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": partial(check_real, open_lo=True),
        "damping": check_real,
        "adapt_damping": check_bool,
        "cg_max_iter": check_int,
        "cg_rtol": lambda v, name: None if v is None else check_real(v, name, open_lo=True, hi=1.0),
        "warm_start": partial(check_real, hi=1.0),
        "curvature": lambda v, name: check_choice(v, name, CURVATURES),
        "subsample": _check_subsample,
        "subsample_growth": check_real,
        "subsample_max": partial(_check_subsample, none=" or None"),
        "preconditioner": _check_preconditioner,
        "l2": check_real,
        "seed": _check_seed,
        "solver": lambda v, name: check_choice(v, name, SOLVERS),
        "dense_max": partial(check_int, minimum=0),
        "max_iter": check_int,
        "tolerance_grad": check_real,
    }
    _state_keys = frozenset(
        (
            "damping",
            "step",
            "cg_iterations",
            "direction",
            "last_decrease",
            "diag_ema",
            "g0_norm",
            "subsample_size",
            "dense_solves",
            "lm_nu",
        )
    )
    curvature = GroupSetting()
    subsample = GroupSetting()
    subsample_growth = GroupSetting()
    subsample_max = GroupSetting()
    preconditioner = GroupSetting()
    l2 = GroupSetting()
    seed = GroupSetting()
    solver = GroupSetting()
    dense_max = GroupSetting()
    max_iter = GroupSetting()
    tolerance_grad = GroupSetting()

    def __init__(
        self,
        params,
        *,
        lr: float,
        damping: float,
        adapt_damping: bool,
        curvature: str | None,
        model: nn.Module | None,
        loss_fn: Any,
        subsample: int | float | None,
        cg_max_iter: int,
        cg_rtol: float | None,
        warm_start: float,
        preconditioner: str | None,
        seed: int,
        l2: float = 0.0,
        io: ModelIO | None = None,
        solver: str = "cg",
        dense_max: int = 0,
        subsample_growth: float = 0.0,
        subsample_max: int | float | None = None,
        max_iter: int = 1,
        tolerance_grad: float = 0.0,
    ):
        if io is not None and not isinstance(io, ModelIO):
            raise TypeError(f"io must be a hesse.ModelIO, got {type(io).__name__}")
        if (model is None) != (loss_fn is None):
            raise ValueError("give both model and loss_fn (for curvature on a batch), or neither")
        if curvature is None:
            curvature = "ggn" if model is not None and isinstance(self, HessianFree) else "hessian"
        defaults = {
            "lr": lr,
            "damping": damping,
            "adapt_damping": bool(adapt_damping),
            "cg_max_iter": cg_max_iter,
            "cg_rtol": cg_rtol,
            "warm_start": warm_start,
            "curvature": curvature,
            "subsample": subsample,
            "subsample_growth": subsample_growth,
            "subsample_max": subsample_max,
            "preconditioner": preconditioner,
            "l2": l2,
            "seed": seed,
            "solver": solver,
            "dense_max": dense_max,
            "max_iter": max_iter,
            "tolerance_grad": tolerance_grad,
        }
        for key, check in self._group_checks.items():  # the rules a step re-checks
            defaults[key] = check(defaults[key], key)
        self.model, self.loss_fn = model, loss_fn
        self.io = io if io is not None else ModelIO()
        self._check_wiring(curvature)
        super().__init__(params, defaults)

    def _check_wiring(self, curvature: str) -> None:
        if curvature == "ggn" and self.model is None:
            raise ValueError(
                "curvature='ggn' needs model= and loss_fn= (the GGN is built from the model's "
                "outputs); with only parameters, use curvature='hessian'"
            )

    def check_groups(self) -> None:
        super().check_groups()
        self._check_wiring(self.param_groups[0]["curvature"])  # e.g. from a loaded state

    # -- state -------------------------------------------------------------------------
    def _global(self) -> dict:
        """Global state, kept in the first parameter's entry so state_dict() has it."""
        state = self.global_state()
        if "damping" not in state:
            state["damping"] = self.param_groups[0]["damping"]
            state["step"] = 0
            state["cg_iterations"] = 0
        return state

    # -- curvature ---------------------------------------------------------------------
    def _operator(self, ev, batch, data=None):
        """The curvature operator: the Hessian through the closure's graph, or with a
        model and a batch, the batch curvature on its subsample (``data`` where it is
        drawn already; plus ``l2 I``)."""
        flat = self.flat
        if self.model is None or batch is None:
            if self.model is not None and self.curvature == "ggn":
                raise ValueError(
                    "curvature='ggn': pass the batch, step(closure, batch=(inputs, targets))"
                )
            return ev.hessian()
        if data is None:
            data = self._draw(batch)
        op = self._batch_curvature(data).linearize()
        if self.l2 > 0:  # the penalty in the closure's loss, which loss_fn does not see
            op = op + IdentityOperator(flat.size, flat.dtype, flat.device) * self.l2
        return op

    def _batch_curvature(self, data):
        """The curvature operator on a batch (across processes: over every one's batch)."""
        cls = GGNOperator if self.curvature == "ggn" else HessianOperator
        return self._reducer.operator(
            cls, self.model, self.loss_fn, data, params=self.flat.params, io=self.io
        )

    def _draw(self, batch):
        """The curvature's subsample of ``batch`` (a failure stops every process)."""
        return self._reducer.attempt("drawing the curvature's subsample", self._subsample, batch)

    def _subsample(self, batch):
        subsample = self.subsample
        if subsample is None or not self.io.is_batch(batch):
            return batch
        n = self.io.samples(batch)
        if self._uses_dense(batch):  # a fraction gives at least a few samples per unknown
            k = dense_subsample_count(subsample, n, self.flat.size)
        else:
            k = subsample if isinstance(subsample, int) else max(1, round(subsample * n))
        state = self._global()
        g_norm = getattr(self, "_g_norm", None)
        growth = self.subsample_growth
        if growth > 0 and g_norm is not None and "g0_norm" in state:
            cap = self.subsample_max
            cap = n if cap is None else cap if isinstance(cap, int) else max(1, round(cap * n))
            k = max(k, subsample_size(k, min(cap, n), g_norm, state["g0_norm"], growth))
        state["subsample_size"] = min(k, n)
        if k >= n:
            return batch
        # One derivation with minimize("subsampled-newton"): seed and step; across
        # processes each draws its own positions (another seed on each).
        idx = subsample_indices(n, k, self._reducer.shard_seed(self.seed), state["step"])
        return take_samples(batch, n, idx)

    def _uses_dense(self, batch) -> bool:
        """Whether this iteration forms the curvature densely and solves by Cholesky."""
        if self.solver != "auto":
            return self.solver == "cholesky"
        # Without a batch the curvature is the closure's (P products through its graph to
        # form it: CG's few are cheaper). (Across processes the batch is the reducer's,
        # given on every process or on none.)
        return self.model is not None and self.flat.size <= self.dense_max and batch is not None

    def _dense_curvature(self, ev, batch) -> Tensor:
        """The curvature as a dense ``(P, P)`` matrix, penalty ``l2 I`` included: on the
        subsample of ``batch`` in one batched pass (``dense_model_curvature``) where the
        model allows it and that is cheaper, across processes each on its own shard's
        subsample and then averaged by the shards' weights (a mean-reduced loss); else
        from :meth:`_operator`'s products, :data:`DENSE_COLUMNS` columns at a time."""
        data = None
        if self.model is not None and batch is not None:
            if not self._reducer.sharded:
                data = self._draw(batch)
            H = self._one_pass_curvature(batch, data)
            if H is not None:
                if self.l2 > 0:
                    H.diagonal().add_(self.l2)
                return 0.5 * (H + H.T)
        op = self._operator(ev, batch, data)
        op.chunk_size = min(self.flat.size, DENSE_COLUMNS)  # the same on every process
        H = op.to_dense()
        return 0.5 * (H + H.T)

    def _one_pass_curvature(self, batch, data=None) -> Tensor | None:
        """``dense_model_curvature`` on the subsample of ``batch``, or ``None`` where the
        model does not allow it (vmap cannot take one sample at a time: BatchNorm in train
        mode, inputs without a batch dimension; the operator's products then raise any
        error that is the data's) or it costs more than the operator's products (the
        Hessian of a model whose outputs are not linear in its parameters). Across
        processes, the weighted mean of every shard's matrix (one collective of ``P^2``
        numbers), which is the curvature of the union of the subsamples, as the reduced
        operator's; ``None`` on every process where any could not form it, or where the
        loss sums (the reduced operator's sum is kept)."""
        fn, curvature = self._model_loss()
        hessian = self.curvature == "hessian"
        reducer = self._reducer
        if not reducer.sharded:  # on the subsample drawn (``data``)
            try:
                return dense_model_curvature(
                    fn, curvature, data, hessian=hessian, second_term=False
                )
            except (RuntimeError, NotImplementedError, ValueError):
                return None
        if getattr(self.loss_fn, "reduction", "mean") != "mean":
            return None
        P = self.flat.size
        like = [torch.empty(P, P, dtype=self.flat.dtype, device=self.flat.device)]
        like.append(like[0].new_empty(1))

        def compute() -> tuple[list[Tensor | None], float]:
            data = self._subsample(batch)
            if not self.io.is_batch(data) or self.io.samples(data) == 0:
                return [None, None], 0.0  # an empty shard: the others carry it
            try:
                H = dense_model_curvature(fn, curvature, data, hessian=hessian, second_term=False)
            except (RuntimeError, NotImplementedError, ValueError):
                H = None
            if H is None:
                return [None, like[1].new_ones(1)], 1.0  # tell the others: fall back
            return [H, None], fn.weight(data)

        (H, failed), _ = reducer.mean("the dense curvature of a shard", compute, like)
        return None if failed is not None or H is None else H

    _loss_cache: tuple | None = None

    def _model_loss(self) -> ModelLoss:
        """The model's loss as a function of the optimizer's parameters (made once)."""
        key = (id(self.model), id(self.loss_fn))
        if self._loss_cache is None or self._loss_cache[0] != key:
            fn = ModelLoss(self.model, self.loss_fn, self.flat.params, self.io)
            self._loss_cache = (key, fn, OutputCurvature(self.loss_fn))
        return self._loss_cache[1:]

    def _diag_preconditioner(self, op, damping: float, state: dict):
        if self.preconditioner is None:
            return None
        seed = derive_seed(self.seed, "preconditioner", state["step"])
        gen = torch.Generator(device=self.flat.device).manual_seed(seed)
        like = [torch.empty(self.flat.size, dtype=self.flat.dtype, device=self.flat.device)]
        est = hutchinson_diagonal_probe(lambda z: [op @ z[0]], like, gen)[0].abs()
        ema = state.get("diag_ema")
        ema = est if ema is None else 0.9 * ema + 0.1 * est
        state["diag_ema"] = ema
        return (ema + damping).pow(0.75)  # Martens (2010), section 4.7

    # -- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure, batch: Any = None) -> Tensor:
        """Up to ``max_iter`` truncated-Newton iterations (one by default).

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward()``, returns
                the loss (called several times: at the point, and along the step).
            batch: with ``model`` and ``loss_fn``, the ``(inputs, targets)`` batch the
                curvature is measured on (a subsample of it if ``subsample`` is set).

        Returns:
            The loss at the start of the step.
        """
        self.check_groups()
        name = type(self).__name__
        ev = self._evaluate(f"{name}: the start of a step", closure, self._needs_graph(batch))
        batch = self._reducer.batch(batch)
        graph = self._needs_graph(batch)
        first = ev.f
        max_iter = self.max_iter
        for i in range(max_iter):
            if not ev.finite:
                if i == 0:
                    raise FloatingPointError(
                        "the loss or its gradient is not finite at the current parameters "
                        f"(loss {ev.f})"
                    )
                break
            if float(ev.g.abs().max()) <= self.tolerance_grad:
                ev.release()
                break
            nxt = self._iteration(closure, batch, ev)
            if nxt is None or i == max_iter - 1:
                break
            # The line search's evaluation at the accepted point starts the next
            # iteration, unless the curvature needs the closure's graph there.
            if graph:
                ev = self._evaluate(f"{name}: the start of an iteration", closure, True)
            else:
                ev = nxt
        return torch.tensor(first)

    def _needs_graph(self, batch) -> bool:
        """Whether the curvature is the closure's own, through its graph."""
        return self.model is None or batch is None

    def _iteration(self, closure: Closure, batch: Any, ev) -> Any:
        """One iteration from the evaluation ``ev`` at the current parameters: the damped
        direction (:meth:`_direction`), the search along it
        (:func:`hesse.solvers.search_iteration`), the damping adapted by the reduction
        ratio; returns the evaluation at the accepted point, or ``None`` where no step
        was taken."""
        flat = self.flat
        state = self._global()
        x = flat.get()
        ev.x = x
        self._g_norm = g_norm = float(ev.g.norm())
        state.setdefault("g0_norm", g_norm)
        damping = state["damping"]
        dense = self._uses_dense(batch)
        descent = self._direction(closure, batch, ev, state, damping, dense)
        if descent is None:
            return self._skip(state, damping)
        state["direction"] = descent.d.clone()
        name = type(self).__name__

        def evaluate(x_new: Tensor):
            flat.set(x_new)
            e = self._evaluate(f"{name}: the line search", closure)
            e.x = x_new
            return e

        strong = self._line_search == "strong-wolfe"
        it = search_iteration(
            ev,
            descent,
            evaluate,
            self._line_search,
            c1=1e-4 if strong else ARMIJO_C1,
            scale=self.param_groups[0]["lr"],
            retry=False,
        )
        if it.accepted:
            flat.set(it.point.x)
            state["last_decrease"] = descent.last_decrease
        else:
            flat.set(x)  # no decrease found: stay, and damp harder
            state.pop("direction", None)
        if self.param_groups[0]["adapt_damping"] and damping > 0 and descent.informative(ev, it):
            rho = descent.ratio(ev, it)
            if dense:
                # Nielsen's rule: an exact solve makes rho a reliable verdict, and the
                # damping falls three times per good step (Martens' 2/3 held it above the
                # smallest curvature of an ill-conditioned problem for ten steps).
                state["damping"], state["lm_nu"] = lm_damping(damping, state.get("lm_nu", 2.0), rho)
            else:
                state["damping"] = martens_damping(damping, rho)
        state["step"] += 1
        return it.point

    def _direction(self, closure, batch, ev, state: dict, damping: float, dense: bool):
        """The damped Newton direction at ``ev`` as a :class:`~hesse.solvers.NewtonDescent`
        (with its model value, and the first-step rule of this optimizer's search), or
        ``None`` where the curvature was not finite: from the dense curvature by a damped
        solve, or from CG on the operator (with Martens' backtracking over CG's iterates:
        from the last back, the one with the best objective)."""
        g = ev.g
        repeat = self._line_search == "strong-wolfe"
        last = state.get("last_decrease")
        if dense:
            try:
                H = self._dense_curvature(ev, batch)
            except NonFiniteError:
                H = None
            ev.release()
            if H is None or not bool(torch.isfinite(H).all()):
                return None
            d, q = dense_newton_direction(H, g, damping)
            state["dense_solves"] = state.get("dense_solves", 0) + 1
            return NewtonDescent(d, q, lambda v: H @ v, repeat_decrease=repeat, last_decrease=last)
        found = self._cg_direction(ev, batch, state, damping)
        if found is None:
            return None
        candidates, op = found
        d, q = candidates[-1]
        if len(candidates) > 1:
            flat, x = self.flat, ev.x
            best_f = math.inf
            for cand in reversed(candidates):
                flat.set(x + cand[0])
                f_c = self._evaluate(f"{type(self).__name__}: CG backtracking", closure).f
                if not f_c < best_f:
                    break
                best_f, (d, q) = f_c, cand
        # -g's model needs C g: from the batch curvature, which outlives the closure's
        # graph (released above); with the graph's Hessian, -g is judged on its slope.
        curvature = None if self._needs_graph(batch) else op.__matmul__
        return NewtonDescent(d, q, curvature, repeat_decrease=repeat, last_decrease=last)

    def _skip(self, state: dict, damping: float) -> None:
        """A curvature product overflowed (seen with a float32 loss near 1e-9, where the
        GGN's softmax terms underflow): keep the parameters, damp harder, go on."""
        state["damping"] = max(damping, 1e-8) * 10.0
        state.pop("direction", None)
        state["step"] += 1
        return None

    def _cg_direction(self, ev, batch, state: dict, damping: float):
        """Candidates ``[(direction, model value)]`` from CG on the damped curvature
        operator (the CG iterates kept for backtracking, then the last), or ``None``
        where a product was not finite."""
        flat = self.flat
        group = self.param_groups[0]
        g = ev.g
        op = self._operator(ev, batch)
        A = (
            op + IdentityOperator(flat.size, flat.dtype, flat.device) * damping
            if damping > 0
            else op
        )
        M = self._diag_preconditioner(op, damping, state)
        rtol = group["cg_rtol"] if group["cg_rtol"] is not None else forcing_rtol(float(g.norm()))
        x0 = None
        prev = state.get("direction")
        if group["warm_start"] > 0 and prev is not None and damping > 0:
            x0 = group["warm_start"] * prev
        kept: list[tuple[int, Tensor, float]] = []
        if self._backtrack_cg:
            marks = {math.ceil(1.3**j) for j in range(60)}

            def remember(i, xi, qi):
                if i in marks:
                    kept.append((i, xi, qi))

        else:
            remember = None
        try:
            # CG's iterates are kept for backtracking only on a damped system (positive
            # definite when C is PSD, the GGN): undamped, a truncated path is no model.
            d, res = truncated_newton(
                A,
                g,
                rtol=rtol,
                max_iter=group["cg_max_iter"],
                M=M,
                x0=x0,
                callback=remember if damping > 0 else None,
            )
        except NonFiniteError:
            ev.release()
            return None
        state["cg_iterations"] += res.iterations

        # The undamped model q(p) = g'p + p'Cp/2 of each candidate, from CG's own record of
        # the damped model (q_damped - lambda |p|^2 / 2), or one product for -g.
        def undamped(p: Tensor, q_damped: float) -> float:
            return q_damped - 0.5 * damping * float(p @ p)

        if d is res.x:
            q = undamped(d, res.model)
        else:
            q = float(g @ d) + 0.5 * float(d @ (op @ d))
        ev.release()  # no more products: the curvature's graph can go
        candidates = [(d, q)]
        if self._backtrack_cg and kept and d is res.x:
            candidates = [(xi, undamped(xi, qi)) for _, xi, qi in kept if float(g @ xi) < 0]
            candidates.append((d, q))
        return candidates, op


class HessianFree(_TruncatedNewton):
    r"""Hessian-free optimisation (Martens 2010).

    Each step solves :math:`(C + \lambda I)\,p = -\nabla L` by preconditioned CG, warm-started
    from a decayed copy of the previous solution, with :math:`C` the Gauss-Newton matrix
    on the curvature batch (or the Hessian); evaluates the loss at CG iterates
    :math:`\lceil 1.3^j \rceil` backwards from the last and keeps the best ("CG
    backtracking"); adapts :math:`\lambda` by the ratio :math:`\rho` of actual to predicted
    reduction (:math:`\times 3/2` when :math:`\rho < 1/4`, :math:`\times 2/3` when
    :math:`\rho > 3/4`); and takes a backtracking Armijo step along the result.

    With only parameters, the curvature is the Hessian of the closure's loss (the
    optimizer runs the closure with ``backward(create_graph=True)`` itself). With
    ``model`` and ``loss_fn``, the GGN on ``step(closure, batch=(inputs, targets))``,
    optionally on a ``subsample`` of it.

    Args:
        params: parameters or parameter groups (one flat vector over all groups).
        lr: the first trial step of the line search.
        damping: the initial :math:`\lambda`.
        curvature: ``"ggn"`` (default with a model) or ``"hessian"``.
        model, loss_fn: for curvature on a batch.
        subsample: samples (int) or fraction of the batch for the curvature.
        cg_max_iter: CG iterations per step.
        cg_rtol: CG's relative residual (default: the forcing term
            :math:`\min(0.5, \sqrt{\|g\|})`).
        warm_start: decay of the previous solution used as CG's start.
        preconditioner: ``"hutchinson"`` (a running Hutchinson estimate of
            :math:`|\mathrm{diag}\,C|`, plus :math:`\lambda`, to the power 3/4) or ``None``.
        l2: with ``model``/``loss_fn``: the coefficient of an L2 penalty
            :math:`\tfrac{l_2}{2}\|\theta\|^2` that the closure adds to the loss; its
            curvature :math:`l_2 I` is added to the batch curvature, which does not see it.
        seed: for subsamples and probes.
        io: with ``model``: a :class:`hesse.ModelIO` for batches and outputs the defaults
            do not cover (dict batches and Hugging Face outputs are covered).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HessianFree(model.parameters())
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> for _ in range(5):
        ...     last = opt.step(closure)
        >>> bool(last < first)
        True
    """

    _backtrack_cg = True

    def __init__(
        self,
        params,
        lr: float = 1.0,
        damping: float = 1.0,
        *,
        curvature: str | None = None,
        model: nn.Module | None = None,
        loss_fn: Any = None,
        subsample: int | float | None = None,
        cg_max_iter: int = 100,
        cg_rtol: float | None = None,
        warm_start: float = 0.95,
        preconditioner: str | None = "hutchinson",
        l2: float = 0.0,
        seed: int = 0,
        io: ModelIO | None = None,
    ):
        super().__init__(
            params,
            lr=lr,
            damping=damping,
            adapt_damping=True,
            curvature=curvature,
            model=model,
            loss_fn=loss_fn,
            subsample=subsample,
            cg_max_iter=cg_max_iter,
            cg_rtol=cg_rtol,
            warm_start=warm_start,
            preconditioner=preconditioner,
            seed=seed,
            l2=l2,
            io=io,
        )


class SubsampledNewton(_TruncatedNewton):
    r"""Subsampled Newton (Byrd, Chin, Neveitt & Nocedal 2011; Roosta-Khorasani & Mahoney
    2019): the gradient on the whole batch, the curvature on a subsample :math:`S` of it,

    .. math:: H_S = \frac{1}{|S|} \sum_{i \in S} \nabla^2 \ell_i,

    the damped Newton system :math:`(H_S + \lambda I) p = -g`, Levenberg-Marquardt
    adaptation of :math:`\lambda` and a backtracking line search on the closure's (full)
    loss, so the iterates converge to the minimiser of the full objective whatever the
    subsample. With ``model`` and ``loss_fn``, pass ``step(closure, batch=(inputs,
    targets))`` and the subsample is drawn from it (``subsample``, default 10%, grown as the
    gradient shrinks); with only parameters the curvature is the closure's own (the full
    batch as subsample).

    **Two ways to solve.** When the parameters are few (:math:`P \le` ``dense_max``) and the
    curvature is measured on a batch, :math:`H_S` is formed densely in one batched pass over
    the subsample (``hesse.operators._dense.dense_model_curvature``: the Jacobian by
    forward mode under ``vmap``, :math:`J^\top \nabla^2_o\ell\,J`, i.e.
    :math:`X^\top D X / |S|` for a generalised linear model) and the system is solved by
    Cholesky (an indefinite exact Hessian falls back to the eigenvalue-modified step,
    :func:`hesse.solvers.damped_newton_step`): :math:`O(|S| P^2 + P^3)` work in dense
    kernels, cheaper than the tens of subsampled products an ill-conditioned system needs
    from CG. Otherwise CG on subsampled
    curvature products, to the forcing tolerance.

    **Growing subsample.** With ``subsample_growth`` :math:`\gamma > 0` the subsample size
    is :math:`|S_0| \max(1, (\|g_0\|/\|g_k\|)^\gamma)`, capped at the batch
    (:func:`hesse.solvers.subsample_size`): a rough curvature far from the solution, where
    the line search decides, and an accurate one near it, where the convergence is then
    superlinear instead of linear at the rate of the sampling error.

    Args:
        params: parameters or parameter groups (one flat vector over all groups).
        lr: the first trial step of the line search.
        damping: the initial :math:`\lambda` (adapted by the reduction ratio).
        curvature: ``"hessian"`` (default) or ``"ggn"`` (with a model; the same matrix for
            a generalised linear model with its canonical loss, cheaper to form densely).
        model, loss_fn: for curvature on a subsample of ``step(..., batch=...)``.
        subsample: samples (int) or fraction of the batch for the curvature, at the start
            (a fraction gives the dense curvature at least 4 samples per unknown).
        subsample_growth: :math:`\gamma` above (0: a fixed subsample).
        solver: ``"auto"`` (Cholesky when :math:`P \le` ``dense_max`` and the curvature is
            on a batch, else CG), ``"cholesky"`` (always dense: without a batch, from
            :math:`P` Hessian-vector products through the closure's graph) or ``"cg"``.
        dense_max: the largest :math:`P` ``"auto"`` forms densely (1024: forming costs
            :math:`|S| P^2` in one matrix product, against :math:`|S| P` per CG product;
            the Jacobians are formed in chunks of at most ``2**24`` entries,
            ``hesse.operators._dense.DENSE_ENTRIES``).
        max_iter: iterations per ``step()`` (as :class:`torch.optim.LBFGS`'s ``max_iter``);
            the line search's evaluation at the accepted point starts the next one, so a
            full-batch run costs one closure call per iteration where the first trial step
            is accepted.
        tolerance_grad: a step stops its iterations when :math:`\|g\|_\infty` falls to it.
        cg_max_iter, cg_rtol: the CG solve's limits (CG path).
        l2: with ``model``/``loss_fn``: the coefficient of an L2 penalty
            :math:`\tfrac{l_2}{2}\|\theta\|^2` that the closure adds to the loss; its
            curvature :math:`l_2 I` is added to the batch curvature, which does not see it.
        seed: for the subsamples.
        io: with ``model``: a :class:`hesse.ModelIO`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> loss_fn = torch.nn.MSELoss()
        >>> opt = SubsampledNewton(model.parameters(), model=model, loss_fn=loss_fn, subsample=16)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure, batch=(x, y))
        >>> bool(opt.step(closure, batch=(x, y)) < first)
        True
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        damping: float = 1e-3,
        *,
        curvature: str = "hessian",
        model: nn.Module | None = None,
        loss_fn: Any = None,
        subsample: int | float | None = 0.1,
        subsample_growth: float = 0.5,
        subsample_max: int | float | None = None,
        solver: str = "auto",
        dense_max: int = 1024,
        max_iter: int = 1,
        tolerance_grad: float = 0.0,
        cg_max_iter: int = 50,
        cg_rtol: float | None = None,
        l2: float = 0.0,
        seed: int = 0,
        io: ModelIO | None = None,
    ):
        super().__init__(
            params,
            lr=lr,
            damping=damping,
            adapt_damping=True,
            curvature=curvature,
            model=model,
            loss_fn=loss_fn,
            subsample=subsample,
            cg_max_iter=cg_max_iter,
            cg_rtol=cg_rtol,
            warm_start=0.0,
            preconditioner=None,
            seed=seed,
            l2=l2,
            io=io,
            solver=solver,
            dense_max=dense_max,
            subsample_growth=subsample_growth,
            subsample_max=subsample_max,
            max_iter=max_iter,
            tolerance_grad=tolerance_grad,
        )


class NewtonCG(_TruncatedNewton):
    r"""Newton-CG for full-batch training of small and medium models: the truncated-Newton
    direction of :func:`hesse.solvers.truncated_newton` (CG to the forcing tolerance
    :math:`\min(0.5, \sqrt{\|g\|})`, negative curvature handled) with a strong-Wolfe line
    search — the mathematics of ``hesse.minimize(method="newton-cg")``, on a model's
    parameters. ``damping > 0`` adds :math:`\lambda I`, adapted by the reduction ratio.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = NewtonCG(model.parameters())
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> bool(opt.step(closure) < first)
        True
    """

    _line_search = "strong-wolfe"

    def __init__(
        self, params, lr: float = 1.0, damping: float = 0.0, *, cg_max_iter: int = 250, cg_rtol=None
    ):
        super().__init__(
            params,
            lr=lr,
            damping=damping,
            adapt_damping=check_real(damping, "damping") > 0,
            curvature="hessian",
            model=None,
            loss_fn=None,
            subsample=None,
            cg_max_iter=cg_max_iter,
            cg_rtol=cg_rtol,
            warm_start=0.0,
            preconditioner=None,
            seed=0,
        )
