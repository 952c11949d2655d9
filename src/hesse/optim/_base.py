"""What hesse's optimizers share: flat views of the parameters of all groups, evaluating a
closure (with the gradient's graph when curvature is needed), curvature from that graph,
the reducer through which data parallelism meets them (:class:`Reducer`), settings kept in
the parameter groups (:class:`GroupSetting`), and validation of hyper-parameters."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from hesse._core import ParamSpace, all_finite
from hesse._core._checks import check_int as _check_int
from hesse._core._checks import check_real
from hesse.func._context import second_order
from hesse.func._engine import graph_hvp
from hesse.operators import CurvatureOperator
from hesse.solvers._point import Point

Closure = Callable[[], Tensor]

_lock = threading.RLock()


@contextlib.contextmanager
def create_graph() -> Iterator[None]:
    """Inside this context, ``loss.backward()`` behaves as ``backward(create_graph=True)``,
    so that a plain closure leaves gradients through which Hessian-vector products can be
    taken. Only optimizers that need second derivatives use it, around their own call of
    the closure; the user's loop is unchanged. (``Tensor.backward`` calls
    ``torch.autograd.backward``, which is swapped for the duration, then restored.)"""
    original = torch.autograd.backward

    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, **kw):
        return original(tensors, grad_tensors, retain_graph, True, **kw)

    with _lock, warnings.catch_warnings():
        # The reference cycle torch warns about is broken by evaluate(), which detaches
        # the .grad attributes right after the closure.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.autograd.backward = backward
        try:
            yield
        finally:
            torch.autograd.backward = original


def check_int(value: object, name: str, minimum: int = 1) -> int:
    return _check_int(value, name, minimum)


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class FlatParams:
    """The trainable parameters of all groups of an optimizer as one flat vector, in the
    :class:`~hesse._core.ParamSpace` they span.

    A parameter that does not require grad (a frozen layer) is not part of the vector: as
    in :mod:`torch.optim`, it is never moved, and no derivative is asked of it.
    ``groups[i]`` holds the trainable parameters of ``optimizer.param_groups[i]``, in order.
    The flat vector needs one dtype and one device for all of them (the space checks it
    when a flat vector is first asked for: the diagonal optimizers, which work per tensor,
    never ask).
    """

    def __init__(self, optimizer: Optimizer):
        self.groups = [[p for p in g["params"] if p.requires_grad] for g in optimizer.param_groups]
        self.params = [p for group in self.groups for p in group]
        if not self.params:
            raise ValueError(
                "no parameter of this optimizer requires grad: every one is frozen, "
                "there is nothing to optimise"
            )
        self.group_of = [i for i, group in enumerate(self.groups) for _ in group]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        self._space: ParamSpace | None = None

    @property
    def space(self) -> ParamSpace:
        if self._space is None:
            self._space = ParamSpace(self.params)
        return self._space

    def get(self) -> Tensor:
        return self.space.flatten([p.detach() for p in self.params])

    @torch.no_grad()
    def set(self, x: Tensor) -> None:
        for p, v in zip(self.params, self.space.unflatten(x)):
            p.copy_(v)

    def grad(self) -> Tensor:
        return self.space.flatten(
            [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]
        )

    def split(self, x: Tensor) -> list[Tensor]:
        return list(self.space.unflatten(x))

    def per_group(self, values: list[float]) -> Tensor:
        """A flat vector holding each parameter's group value (e.g. its group's lr)."""
        return torch.cat(
            [
                torch.full((n,), values[g], dtype=self.dtype, device=self.device)
                for n, g in zip(self.numels, self.group_of)
            ]
        )


class Evaluation(Point):
    """A closure's evaluation at the current parameters, as a
    :class:`hesse.solvers.Point`: ``f`` is the loss, ``grads`` the gradients (one tensor
    per parameter) and ``g`` their flat concatenation (made on first use); where the
    gradients' graph was kept, ``hvp`` (flat) and :meth:`hvp_list` (per parameter) go
    through it. ``x`` is the optimizer's to set, where it needs the point."""

    def __init__(
        self,
        loss: float,
        grads: list[Tensor] | None,
        graph: list[Tensor] | None,
        params: list[Tensor] | None = None,
    ):
        self.grads, self.params = grads, params
        self._graph = graph
        self._g: Tensor | None = None
        super().__init__(None, loss, hvp=self._flat_hvp if graph is not None else None)

    @property
    def g(self) -> Tensor | None:
        if self._g is None and self.grads is not None:
            self._g = torch.cat([t.reshape(-1) for t in self.grads])
        return self._g

    @g.setter
    def g(self, value: Tensor | None) -> None:
        if value is not None:
            self._g = value

    @property
    def finite(self) -> bool:
        return self.grads is not None and math.isfinite(self.f)

    def hvp_list(self, vs: list[Tensor], params: list[Tensor] | None = None) -> list[Tensor]:
        """Hessian times one direction given per parameter, through the kept graph."""
        return graph_hvp(self._graph, self.params if params is None else params, vs)

    def _flat_hvp(self, V: Tensor) -> Tensor:
        """Hessian times ``V`` (flat, ``(P,)`` or ``(P, k)``): :meth:`hvp_list` a column at
        a time (through the graph, or reduced across processes)."""
        sizes = [p.numel() for p in self.params]
        cols = [V] if V.dim() == 1 else list(V.T)
        out = [
            torch.cat(
                [
                    h.reshape(-1)
                    for h in self.hvp_list(
                        [c.view_as(p) for c, p in zip(v.split(sizes), self.params)]
                    )
                ]
            )
            for v in cols
        ]
        return out[0] if V.dim() == 1 else torch.stack(out, dim=1)

    def release(self) -> None:
        self._graph = None
        super().release()


def evaluate(closure: Closure, flat: FlatParams, graph: bool = False) -> Evaluation:
    """Run the closure (which zeroes the gradients, computes the loss and calls
    ``backward()``) and read the loss and the gradients. With ``graph`` the gradients
    keep their graph (see :func:`create_graph`) for Hessian-vector products; the ``.grad``
    attributes are then detached again, so no graph outlives the step through them."""
    if closure is None:
        raise RuntimeError("this optimizer re-evaluates the loss: pass step(closure)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if graph:  # a graph to differentiate again: kernels with double backward
            stack.enter_context(create_graph())
            stack.enter_context(second_order())
        loss = closure()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "the closure must return the loss as a scalar tensor (after calling backward()), "
            f"got {type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )
    if flat.params and all(p.grad is None for p in flat.params):
        raise ValueError(
            "the closure returned the loss but no parameter has a gradient: call "
            "loss.backward() in the closure before returning the loss"
        )
    kept = None
    if graph:
        kept = [torch.zeros_like(p) if p.grad is None else p.grad for p in flat.params]
        for p in flat.params:
            if p.grad is not None:
                p.grad = p.grad.detach()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in flat.params]
    value = float(loss.detach())
    if not math.isfinite(value) or not all_finite(*grads):
        return Evaluation(value, None, None, flat.params)
    return Evaluation(value, grads, kept, flat.params)


class Reducer:
    r"""Where data parallelism meets an optimizer, and what one process does there:
    nothing (this class is the identity).

    Every optimizer of :mod:`hesse.optim` calls its reducer (``self._reducer``, by default
    :data:`LOCAL`) at each point where processes that each hold a shard of the data must
    communicate, and nowhere else; :mod:`hesse.distributed` gives the same classes a
    reducer over a process group, so the optimizers' code has no branch of its own for
    data parallelism and the two cannot drift apart. Each call names its call site
    (``name``); across processes the name, the step and the call's number within the step
    tag the collective, so that processes which took different paths stop with an error
    naming where each one was.

    The points (the data-parallel meaning in brackets):

    - :meth:`evaluate`: the closure's loss and gradient at the current parameters [their
      sample-weighted means over processes; Hessian-vector products through the kept
      graphs are reduced alike];
    - :meth:`batch`: the batch this process's curvature is measured on [a process without
      data follows the others: an empty batch where they have batches, else ``None``];
    - :meth:`operator`: a curvature operator of :mod:`hesse.operators` on a batch [its
      data-parallel twin of :mod:`hesse.distributed`, over every process's batch];
    - :meth:`mean`: tensors computed from this process's data (Kronecker factors,
      Sophia's sampled-label gradient) [their weighted means over processes];
    - :meth:`attempt`: local work whose failure must stop every process (drawing a
      subsample) [one small collective carries the failure];
    - :meth:`check`: an error in a step's arguments [raised in the step's next collective:
      here, and a :class:`~hesse.distributed.RankError` on the others];
    - :meth:`shard_seed`: the seed of draws from data only this process holds (a
      subsample, sampled labels) [another seed on each process];
    - :attr:`sharded`: whether the data is split between processes [then a batch's
      curvature is the reduced operator's, or the weighted :meth:`mean` of every
      process's dense matrix, never this process's batch alone].
    """

    #: Whether each process holds only a shard of the data.
    sharded = False

    def evaluate(self, name: str, closure: Closure, flat: FlatParams, graph: bool = False):
        """Run the closure and read the loss and the gradients (:func:`evaluate`)."""
        return evaluate(closure, flat, graph)

    def batch(self, batch: object) -> object:
        """The batch the curvature is measured on, after the step's first evaluation."""
        return batch

    def operator(self, cls: type, *args, **kwargs) -> CurvatureOperator:
        """``cls(*args, **kwargs)``: an operator of :mod:`hesse.operators` on a batch."""
        return cls(*args, **kwargs)

    def mean(
        self,
        name: str,
        compute: Callable[[], tuple[list[Tensor | None], float | None]],
        like: list[Tensor],
    ) -> tuple[list[Tensor | None], float]:
        """``compute() -> (tensors, weight)``: tensors from this process's data (``None``
        for one it has no part in) and their weight (``None``: this process's share of
        the data). Returns the tensors and the weight, unchanged here; across processes,
        each tensor's weighted mean over the processes that have it (``None`` where none
        has) and the total weight. ``like`` gives each tensor's shape, dtype and device
        (for a process whose ``compute`` failed)."""
        tensors, weight = compute()
        return tensors, 1.0 if weight is None else float(weight)

    def attempt(self, name: str, fn: Callable, *args):
        """``fn(*args)``, whose failure must stop every process."""
        return fn(*args)

    def check(self, name: str, error: Exception | None) -> None:
        """Raise ``error`` (the verdict on a step's arguments), if any."""
        if error is not None:
            raise error

    def shard_seed(self, seed: int) -> int:
        """The seed of draws from data that only this process holds: ``seed`` itself."""
        return seed


#: The reducer of one process: every optimizer's by default.
LOCAL = Reducer()


def _tensors(value: object) -> Iterator[Tensor]:
    """The tensors in a state value (a tensor, or a list or tuple of them)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class GroupSetting:
    """An optimizer-wide setting (a refresh schedule, a seed, a search) kept in every
    parameter group, so that ``state_dict()`` records it and ``load_state_dict()``
    restores it, and read or written as an attribute (``opt.seed``): reading gives the
    first group's value, writing sets every group's."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None):
        if obj is None:
            return self
        return obj.param_groups[0][self.name]

    def __set__(self, obj: object, value: object) -> None:
        for group in obj.param_groups:
            group[self.name] = value


class FlatOptimizer(Optimizer):
    """An optimizer that sees its parameters as one flat vector (:class:`FlatParams`, built
    on first use) and keeps its global state under the first parameter, so that
    ``state_dict()`` carries it.

    Subclasses declare ``_group_checks`` (hyper-parameter name -> ``check(value, name)``,
    the constructor's own rule), which :meth:`check_groups` applies to every group at the
    start of each step, since a scheduler may have set them (``lr = 0`` is refused like at
    construction: these optimizers' ``lr`` scales a search or a step and must be > 0), and
    ``_state_keys`` (every key their state may hold), which :meth:`load_state_dict` checks
    so that the state of another optimizer class or of another model is refused at once.
    ``_global_settings`` names the group keys that are one setting of the whole optimizer
    (read from the first group, e.g. through a :class:`GroupSetting`): every group must
    hold the same value. ``_late_settings`` names those recorded in the groups only
    since hesse 0.1 (they were attributes): a state saved before lacks them and keeps this
    optimizer's values.

    Every evaluation of the closure, and every other point where processes holding shards
    of the data would have to communicate, goes through ``self._reducer`` (a
    :class:`Reducer`: :data:`LOCAL`, the identity, unless :mod:`hesse.distributed` made
    the optimizer).
    """

    _flat: FlatParams | None = None
    #: Where data parallelism would communicate (:class:`Reducer`); one process: none.
    _reducer: Reducer = LOCAL
    _group_checks: ClassVar[dict[str, Callable[[object, str], object]]] = {}
    _state_keys: frozenset[str] = frozenset()
    _global_settings: tuple[str, ...] = ()
    _late_settings: tuple[str, ...] = ()

    def check_groups(self) -> None:
        """Re-validate the hyper-parameters of every group (cheap: a few comparisons)."""
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups):
            for key, check in self._group_checks.items():
                name = f"param_groups[{i}][{key!r}]"
                if key not in group:
                    raise ValueError(
                        f"{name} is missing: these are not {type(self).__name__}'s groups "
                        "(a state_dict of another optimizer class?)"
                    )
                check(group[key], name)
            for key in self._global_settings:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param_groups[{i}][{key!r}] is {group[key]!r} but "
                        f"param_groups[0][{key!r}] is {first[key]!r}: {key} is one setting "
                        f"of the whole {type(self).__name__}, the same in every group"
                    )

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, then a check that the state is
        this class's and fits these parameters; on failure the previous state is kept and
        a ValueError says what does not match."""
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        kept = before[1][0]
        for group in self.param_groups:  # saved before these settings were recorded
            for key in self._late_settings:
                if key not in group:
                    group[key] = kept[key]
        try:
            self._check_loaded()
        except ValueError:
            self.state, self.param_groups = before
            raise

    def _check_loaded(self) -> None:
        cls = type(self).__name__
        self.check_groups()
        flat = self.flat
        for i, p in enumerate(flat.params):
            entry = self.state.get(p, {})
            unknown = sorted(set(entry) - self._state_keys)
            if unknown:
                raise ValueError(
                    f"the loaded state holds {unknown}, which {cls} does not keep: "
                    "it is the state of another optimizer class"
                )
            for key, value in entry.items():
                for t in _tensors(value):
                    ok = t.dim() == 0 or t.shape == p.shape or (i == 0 and t.numel() == flat.size)
                    if not ok:
                        raise ValueError(
                            f"the loaded state's {key!r} has shape {tuple(t.shape)}, which fits "
                            f"neither its parameter {tuple(p.shape)} nor the {flat.size} "
                            f"parameters of this {cls}: it is the state of another model"
                        )

    @property
    def flat(self) -> FlatParams:
        if self._flat is None:
            self._flat = FlatParams(self)
        return self._flat

    def global_state(self) -> dict:
        return self.state[self.flat.params[0]]

    def _evaluate(self, name: str, closure: Closure, graph: bool = False) -> Evaluation:
        """Run the closure and read loss and gradients, through the reducer (every
        evaluation of an optimizer goes through here; ``name`` says which one)."""
        return self._reducer.evaluate(name, closure, self.flat, graph)


def check_betas(betas: object, name: str = "betas") -> tuple[float, float]:
    """Two exponential-averaging rates in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return (
        check_real(betas[0], f"{name}[0]", hi=1.0, open_hi=True),
        check_real(betas[1], f"{name}[1]", hi=1.0, open_hi=True),
    )
