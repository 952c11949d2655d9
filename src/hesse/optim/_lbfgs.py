"""L-BFGS for models, on the shared two-loop recursion and strong-Wolfe line search."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from hesse.optim._base import Closure, FlatOptimizer, check_bool, check_int, check_real
from hesse.solvers import LINE_SEARCHES as _SEARCHES
from hesse.solvers import LBFGSDescent, LBFGSMemory, search_iteration

LINE_SEARCHES = (*_SEARCHES, None)


def _check_line_search(value: object, name: str) -> str | None:
    if value not in LINE_SEARCHES:
        raise ValueError(f"{name} must be one of {LINE_SEARCHES}, got {value!r}")
    return value


class _Descent(LBFGSDescent):
    """L-BFGS's descent, counting the resets in the optimizer's state."""

    def __init__(self, memory: LBFGSMemory, scale: Tensor, on_reset: Callable[[], None]):
        super().__init__(memory, scale)
        self._on_reset = on_reset

    def reset(self) -> None:
        self._on_reset()


class LBFGS(FlatOptimizer):
    r"""Limited-memory BFGS (Nocedal 1980; Liu & Nocedal 1989) as a ``torch.optim``
    optimizer: the method of :class:`torch.optim.LBFGS`, on :mod:`hesse.solvers`' two-loop
    recursion, first step and curvature update (:class:`~hesse.solvers.LBFGSMemory`) and
    strong-Wolfe line search (:func:`~hesse.solvers.line_search`): the same calls as
    ``hesse.minimize(method="l-bfgs")``, so that with ``lr=1`` and
    ``history_size`` = ``memory`` the two take the same iterates (one per ``step()`` with
    ``max_iter=1``).

    Unlike :class:`torch.optim.LBFGS`, the first step (and the first after the memory is
    cleared) is :math:`\min(1, 1/\|g\|_2)` times ``lr``, not
    :math:`\min(1, 1/\|g\|_1)`: a unit distance at most, whatever the number of
    parameters (:func:`~hesse.solvers.initial_step`).

    What it does that :class:`torch.optim.LBFGS` does not:

    * a non-finite loss or gradient does not poison it: a trial point where the loss is
      not finite shortens the step; a step that starts from a non-finite loss restores
      the best parameters seen, clears the memory and returns;
    * several parameter groups (one flat vector; a group's ``lr`` scales its block of
      the direction; the other settings are one for all groups, and a group that differs
      is refused);
    * ``batch_mode=True`` for mini-batches (multi-batch L-BFGS, Berahas, Nocedal & Takáč
      2016): one iteration per step with step ``lr`` and no line search, the curvature pair
      measured on the *same* batch at both ends of the step (the closure is called twice),
      so that sampling noise does not enter :math:`y`; pairs are Powell-damped, and a step
      that increases the batch's loss is undone (and the memory cleared).

    Args:
        params: parameters or parameter groups.
        lr: scales the direction (1 for full-batch L-BFGS, where the line search sets the
            step; in ``batch_mode``, the step length).
        max_iter: iterations per ``step()`` in full-batch mode (as torch's ``max_iter``).
        history_size: curvature pairs kept (100, as torch.optim.LBFGS: on the digits
            logistic regression 10 pairs took 70 evaluations to within 1e-6 of the
            optimum, 100 took 50).
        tolerance_grad: a step stops when :math:`\|g\|_\infty` falls below it.
        tolerance_change: ... or when the loss or the step changes by less.
        line_search: ``"strong-wolfe"`` (default), ``"wolfe"`` (the weak curvature
            condition), ``"armijo"``, or ``None`` (a fixed step: ``lr`` times the first
            step).
        batch_mode: multi-batch L-BFGS for stochastic gradients.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> opt = LBFGS([w])
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     _ = opt.step(closure)
        >>> w.detach().round(decimals=4)
        tensor([1., 1.])
    """

    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": partial(check_real, open_lo=True),
        "max_iter": check_int,
        "history_size": check_int,
        "tolerance_grad": check_real,
        "tolerance_change": check_real,
        "line_search": _check_line_search,
        "batch_mode": check_bool,
    }
    #: One setting for all groups (only ``lr`` may differ between groups).
    _global_settings = (
        "max_iter",
        "history_size",
        "tolerance_grad",
        "tolerance_change",
        "line_search",
        "batch_mode",
    )
    _state_keys = frozenset(
        ("s", "y", "rho", "n_iter", "func_evals", "best_loss", "best_x", "resets", "last_alpha")
    )

    def __init__(
        self,
        params,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        line_search: str | None = "strong-wolfe",
        batch_mode: bool = False,
    ):
        defaults = {
            "lr": check_real(lr, "lr", open_lo=True),
            "max_iter": check_int(max_iter, "max_iter"),
            "history_size": check_int(history_size, "history_size"),
            "tolerance_grad": check_real(tolerance_grad, "tolerance_grad"),
            "tolerance_change": check_real(tolerance_change, "tolerance_change"),
            "line_search": _check_line_search(line_search, "line_search"),
            "batch_mode": bool(batch_mode),
        }
        super().__init__(params, defaults)

    def _state(self) -> dict:
        state = self.global_state()
        if "s" not in state:
            state.update(
                s=[],
                y=[],
                rho=[],
                n_iter=0,
                func_evals=0,
                best_loss=math.inf,
                best_x=None,
                resets=0,
            )
        return state

    def _memory(self, state) -> LBFGSMemory:
        """The two-loop memory over the state's own lists (no copy: a push is saved)."""
        size = self.param_groups[0]["history_size"]
        return LBFGSMemory(size=size, s=state["s"], y=state["y"], rho=state["rho"])

    def _remember(self, state, loss: float, x: Tensor) -> None:
        if loss < state["best_loss"]:
            state["best_loss"], state["best_x"] = loss, x.clone()

    def _reset(self, state, mem: LBFGSMemory) -> None:
        mem.clear()
        state["resets"] += 1
        state.pop("last_alpha", None)

    @torch.no_grad()
    def step(self, closure: Closure) -> Tensor:
        """Up to ``max_iter`` L-BFGS iterations (one in ``batch_mode``).

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward()``, returns
                the loss.

        Returns:
            The loss at the start of the step.
        """
        self.check_groups()
        flat = self.flat
        group = self.param_groups[0]
        state = self._state()
        mem = self._memory(state)
        scale = flat.per_group([g["lr"] for g in self.param_groups])
        x = flat.get()
        ev = self._evaluate("L-BFGS: the start of a step", closure)
        state["func_evals"] += 1
        first_loss = torch.tensor(ev.f)
        if not ev.finite:
            # Back off: the best point seen, an empty memory; the next step starts afresh.
            if state["best_x"] is not None:
                flat.set(state["best_x"])
            self._reset(state, mem)
            return first_loss
        self._remember(state, ev.f, x)
        if group["batch_mode"]:
            self._batch_step(closure, state, mem, x, ev, scale)
            return first_loss
        descent = _Descent(mem, scale, lambda: self._reset(state, mem))

        def evaluate(x_new: Tensor):
            flat.set(x_new)
            e = self._evaluate("L-BFGS: the line search", closure)
            state["func_evals"] += 1
            e.x = x_new
            return e

        search = group["line_search"]
        ev.x = x
        for _ in range(group["max_iter"]):
            if float(ev.g.abs().max()) <= group["tolerance_grad"]:
                break
            # hesse.minimize(method="l-bfgs")'s iteration, call for call: the two-loop
            # direction, its first step, the named search (-g once more after a failed
            # one), the Powell-damped pair (with lr = 1 the iterates are the same).
            it = search_iteration(ev, descent, evaluate, search, retry=search is not None)
            if not it.accepted:
                flat.set(x)
                if search is None:  # a fixed step that left the domain: start afresh
                    descent.reset()
                break
            new = it.point
            state["n_iter"] += 1
            change = abs(new.f - ev.f)
            x, ev = new.x, new
            flat.set(x)
            self._remember(state, ev.f, x)
            step_inf = float((it.alpha * it.d).abs().max())
            if change < group["tolerance_change"] or step_inf <= group["tolerance_change"]:
                break
        return first_loss

    def _batch_step(self, closure, state, mem, x, ev, scale) -> None:
        """Multi-batch L-BFGS: a fixed step, and the pair from the same batch at both ends."""
        if float(ev.g.abs().max()) <= self.param_groups[0]["tolerance_grad"]:
            return  # nothing to do on this batch (e.g. a float32 loss that underflowed to 0)
        d = mem.direction(ev.g) * scale
        if not float(ev.g @ d) < 0:
            self._reset(state, mem)
            d = -ev.g * scale
        if not len(mem):
            # torch.optim.LBFGS's first step, 1 / ||g||_1, not the line-search one
            # (solvers.initial_step, 1 / ||g||_2): multi-batch L-BFGS has no counterpart
            # in minimize, and its measured results (benchmarks/train.py, part b) were
            # taken with this rule. (On the digits MLP, 3 epochs of batches of 64, the
            # 2-norm gave final losses 0.10-0.11 against 0.08-0.13 for lr 0.05-0.5:
            # no reason to change.)
            d = d * min(1.0, 1.0 / float(ev.g.abs().sum()))
        s = d  # the group's lr is in d already: the step length of multi-batch L-BFGS
        x_new = x + s
        flat = self.flat
        flat.set(x_new)
        new = self._evaluate("L-BFGS: the same batch at the new point", closure)
        state["func_evals"] += 1
        if not new.finite or new.f > ev.f:
            # The step made this batch's loss worse (or not finite): undo it and forget
            # the memory, whose curvature no longer fits. Without this check the loss of
            # the digits MLP went from 1e-3 to 1e3 within an epoch once it was near 0.
            flat.set(x)
            self._reset(state, mem)
            return
        # Powell damping (B s = -lr g for the implicit B when the direction is -lr H g):
        # under sampling noise y can be far smaller than the curvature the memory holds.
        mem.update(s, new.g - ev.g, -ev.g * scale)
        state["n_iter"] += 1
