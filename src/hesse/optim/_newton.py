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
from hesse.func._io import ModelIO, map_tensors
from hesse.linalg import cg
from hesse.operators import GGNOperator, HessianOperator, IdentityOperator
from hesse.optim._base import (
    Closure,
    FlatOptimizer,
    GraphHessian,
    check_float,
    check_int,
)
from hesse.solvers import (
    armijo,
    forcing_rtol,
    hutchinson_diagonal_probe,
    martens_damping,
    repeat_decrease_step,
    strong_wolfe,
    truncated_newton,
)

CURVATURES = ("hessian", "ggn")


class _TruncatedNewton(FlatOptimizer):
    """The shared loop: evaluate the closure, build the curvature operator :math:`C`, solve
    :math:`(C + \\lambda I) p = -g` by CG, adapt :math:`\\lambda` by the reduction ratio,
    search along :math:`p`."""

    #: Defaults of subclasses.
    _backtrack_cg = False
    _line_search = "armijo"
    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": partial(check_float, open_lo=True),
        "damping": check_float,
        "cg_max_iter": check_int,
        "cg_rtol": lambda v, name: v is None or check_float(v, name, open_lo=True, hi=1.0),
        "warm_start": partial(check_float, hi=1.0),
    }
    _state_keys = frozenset(
        ("damping", "step", "cg_iterations", "direction", "last_decrease", "diag_ema")
    )

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
    ):
        lr = check_float(lr, "lr", open_lo=True)
        if io is not None and not isinstance(io, ModelIO):
            raise TypeError(f"io must be a hesse.ModelIO, got {type(io).__name__}")
        self.l2 = check_float(l2, "l2")
        damping = check_float(damping, "damping")
        if (model is None) != (loss_fn is None):
            raise ValueError("give both model and loss_fn (for curvature on a batch), or neither")
        if curvature is None:
            curvature = "ggn" if model is not None and isinstance(self, HessianFree) else "hessian"
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if curvature == "ggn" and model is None:
            raise ValueError(
                "curvature='ggn' needs model= and loss_fn= (the GGN is built from the model's "
                "outputs); with only parameters, use curvature='hessian'"
            )
        if subsample is not None:
            ok = (
                isinstance(subsample, int) and not isinstance(subsample, bool) and subsample >= 1
            ) or (isinstance(subsample, float) and 0 < subsample <= 1)
            if not ok:
                raise ValueError(
                    "subsample must be a number of samples (int >= 1) or a fraction in (0, 1], "
                    f"got {subsample!r}"
                )
        if preconditioner not in (None, "hutchinson"):
            raise ValueError(f"preconditioner must be None or 'hutchinson', got {preconditioner!r}")
        defaults = {
            "lr": lr,
            "damping": damping,
            "adapt_damping": bool(adapt_damping),
            "cg_max_iter": check_int(cg_max_iter, "cg_max_iter"),
            "cg_rtol": None
            if cg_rtol is None
            else check_float(cg_rtol, "cg_rtol", open_lo=True, hi=1.0),
            "warm_start": check_float(warm_start, "warm_start", hi=1.0),
        }
        super().__init__(params, defaults)
        self.curvature, self.model, self.loss_fn = curvature, model, loss_fn
        self.subsample, self.preconditioner = subsample, preconditioner
        self.io = io if io is not None else ModelIO()
        self.seed = int(seed)

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
    def _operator(self, ev, batch):
        flat = self.flat
        if self.model is None or batch is None:
            if self.model is not None and self.curvature == "ggn":
                raise ValueError(
                    "curvature='ggn': pass the batch, step(closure, batch=(inputs, targets))"
                )
            return GraphHessian(ev, flat)
        op = self._batch_curvature(self._subsample(batch)).linearize()
        if self.l2 > 0:  # the penalty in the closure's loss, which loss_fn does not see
            op = op + IdentityOperator(flat.size, flat.dtype, flat.device) * self.l2
        return op

    def _batch_curvature(self, data):
        """The curvature operator on a batch (data-parallel optimizers reduce it)."""
        cls = GGNOperator if self.curvature == "ggn" else HessianOperator
        return cls(self.model, self.loss_fn, data, params=self.flat.params, io=self.io)

    #: Added to the subsample's seed (data-parallel ranks draw different positions).
    _seed_offset = 0

    def _subsample(self, batch):
        if self.subsample is None or not self.io.is_batch(batch):
            return batch
        n = self.io.samples(batch)
        k = self.subsample if isinstance(self.subsample, int) else max(1, round(self.subsample * n))
        if k >= n:
            return batch
        state = self._global()
        gen = torch.Generator().manual_seed(self.seed + 7919 * state["step"] + self._seed_offset)
        idx = torch.randperm(n, generator=gen)[:k]
        # every tensor of the batch with the samples along its first dimension (inputs of
        # any layout, dict batches, sequence targets) is indexed alike
        return map_tensors(
            batch, lambda t: t[idx.to(t.device)] if t.dim() > 0 and t.shape[0] == n else t
        )

    def _diag_preconditioner(self, op, damping: float, state: dict):
        if self.preconditioner is None:
            return None
        gen = torch.Generator(device=self.flat.device).manual_seed(
            self.seed + 104729 * state["step"]
        )
        like = [torch.empty(self.flat.size, dtype=self.flat.dtype, device=self.flat.device)]
        est = hutchinson_diagonal_probe(lambda z: [op @ z[0]], like, gen)[0].abs()
        ema = state.get("diag_ema")
        ema = est if ema is None else 0.9 * ema + 0.1 * est
        state["diag_ema"] = ema
        return (ema + damping).pow(0.75)  # Martens (2010), section 4.7

    # -- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure, batch: Any = None) -> Tensor:
        """One truncated-Newton step.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward()``, returns
                the loss (called several times: at the point, and along the step).
            batch: with ``model`` and ``loss_fn``, the ``(inputs, targets)`` batch the
                curvature is measured on (a subsample of it if ``subsample`` is set).

        Returns:
            The loss at the start of the step.
        """
        self.check_groups()
        flat = self.flat
        group = self.param_groups[0]
        state = self._global()
        x = flat.get()
        graph = self.model is None or batch is None
        ev = self._evaluate(closure, graph=graph)
        if not ev.finite:
            raise FloatingPointError(
                f"the loss or its gradient is not finite at the current parameters (loss {ev.loss})"
            )
        g = ev.g
        damping = state["damping"]
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
            if damping > 0:  # the damped system is positive definite when C is PSD (GGN)
                res = cg(
                    A, -g, x0, M=M, rtol=rtol, max_iter=group["cg_max_iter"], callback=remember
                )
                d = res.x if bool(res.x.abs().max() > 0) and float(g @ res.x) < 0 else -g
            else:
                d, res = truncated_newton(
                    A, g, rtol=rtol, max_iter=group["cg_max_iter"], M=M, x0=x0
                )
        except NonFiniteError:
            # A curvature product overflowed (seen with a float32 loss near 1e-9, where the
            # GGN's softmax terms underflow): keep the parameters, damp harder, go on.
            ev.release()
            state["damping"] = max(damping, 1e-8) * 10.0
            state.pop("direction", None)
            state["step"] += 1
            return torch.tensor(ev.loss)
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
        # Martens' CG backtracking: from the last iterate back, keep the best objective.
        if len(candidates) > 1:
            best_f, best = math.inf, candidates[-1]
            for cand in reversed(candidates):
                flat.set(x + cand[0])
                f_c = self._evaluate(closure).loss
                if not f_c < best_f:
                    break
                best_f, best = f_c, cand
            d, q = best
        state["direction"] = d.clone()
        slope = float(g @ d)

        def phi(alpha: float):
            flat.set(x + alpha * d)
            e = self._evaluate(closure)
            return e.loss, float(e.g @ d) if e.finite else math.nan, e

        if self._line_search == "strong-wolfe":
            alpha0 = repeat_decrease_step(state.get("last_decrease"), slope, 1.0, cap=1.0)
            ls = strong_wolfe(phi, ev.loss, slope, group["lr"] * alpha0)
        else:
            ls = armijo(phi, ev.loss, slope, group["lr"], c1=1e-2)
        if ls.accepted:
            flat.set(x + ls.alpha * d)
            f_new = ls.f
            state["last_decrease"] = ev.loss - f_new
        else:
            flat.set(x)  # no decrease found: stay, and damp harder
            f_new = ev.loss
            state.pop("direction", None)
        if group["adapt_damping"] and damping > 0:
            # rho: actual over predicted reduction of the undamped model along alpha d,
            # m(alpha) = alpha g'd + alpha^2 d'Cd / 2, with d'Cd = 2 (q - g'd).
            rho = -math.inf
            if ls.accepted:
                a = ls.alpha
                pred = a * slope + a * a * (q - slope)
                rho = (f_new - ev.loss) / pred if pred < 0 else -math.inf
            state["damping"] = martens_damping(damping, rho)
        state["step"] += 1
        return torch.tensor(ev.loss)


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

    an inexact CG solve of :math:`(H_S + \lambda I) p = -g`, Levenberg-Marquardt damping and
    a backtracking line search. With ``model`` and ``loss_fn``, pass
    ``step(closure, batch=(inputs, targets))`` and the subsample is drawn from it
    (``subsample``, default 10%); with only parameters the curvature is the closure's own
    (the full batch as subsample).

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
        >>> bool(opt.step(closure) < 0.5 * first)  # a quadratic: solved in one step
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
            adapt_damping=damping > 0,
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
