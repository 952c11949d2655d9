"""Curvature operators whose data is sharded over the ranks of a process group."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from hesse import operators
from hesse._core import check_finite
from hesse.distributed._comm import as_communicator
from hesse.func._model import ModelLoss
from hesse.operators._model import LinearizedCurvature, ModelCurvature, _check_data


class _DataParallel(ModelCurvature):
    """Mixin: each rank holds a shard of the data; a product is every rank's sum over its
    batches (weighted by batch size), all-reduced together with the sample counts in one
    collective, then divided by the total count. Every rank gets the same result: the
    operator of the loss over the union of the shards.

    Each collective is tagged with its call site and the number of its calls there on the
    communicator (:meth:`~hesse.distributed.Communicator.tag`): ``"making a
    HessianOperator"``, ``"the operands of a HessianOperator product"`` (the operand
    check), ``"a HessianOperator product"``, ``"HessianOperator.linearize()"``; ranks
    that took different paths (one product more on one rank) stop with a
    :class:`~hesse.distributed.RankError` saying where each one was."""

    _empty_ok = True  # a rank may hold no batch (an uneven split); the others carry it

    def __init__(self, model, loss_fn, data, params=None, *, group=None, timeout=None, **kw):
        """The local operator's own arguments, passed through as they are (so that the two
        never drift apart), plus ``group`` and ``timeout``."""
        local = _local_class(type(self))
        self._construct(
            lambda: local.__init__(self, model, loss_fn, data, params, **kw), group, timeout
        )

    def _construct(self, init, group: Any, timeout: float | None) -> None:
        """Run the local constructor ``init()``; a rank whose construction fails tells the
        others (one small collective), so that none of them waits for it in a product.
        The same collective says whether every rank knows its parameters to be in sync
        (an optimizer of :mod:`hesse.distributed` has just synchronised them); if any does
        not, every rank checks that the parameters agree."""
        self.comm = as_communicator(group, timeout)
        self.comm.attempt(
            init,
            f"making a {type(self).__name__}",
            params=lambda _: self.fn._selected,
            flatten=lambda _: self.space.flatten(self.fn.params()),
        )

    def _combine(self, parts, V: Tensor) -> Tensor:
        mean = self.reduction == "mean"

        def compute() -> tuple[Tensor, float]:
            total, n, weighted = self._local_sum(parts, V)
            self._check_losses()  # here, so that a NaN loss is carried to every rank
            if mean and not weighted:  # one batch: its mean, to be weighted by its size
                total = total * n
            return total, float(n)

        like = V if V.dtype in (torch.float32, torch.float64) else V.float()
        what = f"a {type(self).__name__} product"  # the call sites: its operands, then it
        self.comm.check_operand(V, what)
        total, n = self.comm.run_reduced(compute, like, what)
        if n == 0:
            raise ValueError("no rank holds any data: every shard is empty")
        return (total / n if mean else total).to(V.dtype)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        return self.comm.synchronize_generator(generator)

    def linearize(self, memory_budget: object = None) -> LinearizedCurvature:
        """As :meth:`ModelCurvature.linearize`; a rank that fails to build its graphs tells
        the others at once (one small collective) instead of leaving them waiting in the
        first product."""
        return self.comm.attempt(
            lambda: LinearizedCurvature(self, memory_budget), f"{type(self).__name__}.linearize()"
        )


_ARGS_DOC = """
    Same arguments as :class:`hesse.{name}`, with ``data`` this rank's shard (it may be
    empty on some ranks), plus:

    Args:
        group: the ``torch.distributed`` process group (default: the world), or a
            :class:`~hesse.distributed.Communicator` to share (and its time counters).
        timeout: seconds a rank waits for the others in one collective before raising
            :class:`~hesse.distributed.RankError` (default 300).

    The model's parameters must be the same on every rank (checked when the operator is
    made). Products, :func:`hesse.eigenvalues`, :func:`hesse.trace`,
    :func:`hesse.spectral_density` and CG on this operator give every rank the same
    result: that of one process over the union of the shards.
"""


def _local_class(cls: type) -> type:
    """The operator of :mod:`hesse.operators` that a data-parallel class extends."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("hesse.operators."))


class HessianOperator(_DataParallel, operators.HessianOperator):
    pass


class GGNOperator(_DataParallel, operators.GGNOperator):
    pass


class FisherOperator(_DataParallel, operators.FisherOperator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Rank 0's seed, then one per rank (Communicator.shard_seed): each shard draws its
        # own targets and the whole draw is reproducible from rank 0's generator. (Below
        # 2**62, as the local operator's: it adds the batch's index.)
        seed = torch.tensor([self._seed], dtype=torch.int64)
        self.comm.broadcast_(seed, "sharing the Monte-Carlo Fisher's seed")
        self._seed = self.comm.shard_seed(int(seed)) % 2**62


class FiniteDifferenceHessian(_DataParallel, operators.FiniteDifferenceHessian):
    # nothing to do once, and the error record stays with the operator
    linearize = operators.FiniteDifferenceHessian.linearize


for _cls in (HessianOperator, GGNOperator, FisherOperator, FiniteDifferenceHessian):
    _base = _local_class(_cls)
    _cls.__doc__ = (
        f"Data-parallel :class:`hesse.{_cls.__name__}`: "
        + (_base.__doc__ or "").strip().split("\n")[0]
        + "\n"
        + _ARGS_DOC.format(name=_cls.__name__)
    )


class _DataParallelKronecker:
    """Mixin for the Kronecker-factored operators: each rank holds a shard of the data;
    the factors' sums (and EKFAC's eigenvalue sums) are every rank's, all-reduced with the
    sample counts and weights in one collective each (as kfac-pytorch and KAISA reduce
    their factors), so every rank holds the factors of one process over the union of the
    shards. Products, inverses, traces and log-determinants then need no communication.
    Each collective is tagged with its call site (``"KFACOperator's factors"``,
    ``"EKFACOperator's eigenvalues"``, ``"making a KFACOperator"``) and its call's number
    there, as :class:`HessianOperator`'s are."""

    _empty_ok = True  # a rank may hold no batch; the others carry it
    _factors_now = False  # computed once every rank has made its operator

    def __init__(self, model, loss_fn, data, params=None, *, group=None, timeout=None, **kw):
        """The local operator's own arguments, plus ``group`` and ``timeout``."""
        local = _local_class(type(self))
        self.comm = as_communicator(group, timeout)
        self.comm.attempt(
            lambda: local.__init__(self, model, loss_fn, data, params, **kw),
            f"making a {type(self).__name__}",
            params=lambda _: self.fn._selected,
            flatten=lambda _: self.space.flatten(self.fn.params()),
        )
        # Rank 0's seed, then one per rank: each shard draws its own labels (fisher="mc").
        seed = torch.tensor([self._seed], dtype=torch.int64)
        self.comm.broadcast_(seed, f"sharing {type(self).__name__}'s seed")
        self._seed = self.comm.shard_seed(int(seed)) % 2**62
        self.update()

    def _reduce(self, compute, sizes: list[int], what: str) -> tuple[list[Tensor], float]:
        """All-reduce the tensors ``compute()`` returns (with its weight) as one buffer."""
        acc = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        like = torch.zeros(sum(sizes), dtype=acc, device=self.device)

        def flat() -> tuple[Tensor, float]:
            parts, weight = compute()
            return torch.cat([t.reshape(-1).to(acc) for t in parts]), weight

        total, weight = self.comm.run_reduced(flat, like, what)
        return list(total.to(self.dtype).split(sizes)), weight

    def _factor_sums(self, per_batch):
        local = _local_class(type(self))
        dims = [(la.d, la.out) for la in self._layers]
        sizes = [d * d for d, _ in dims] + [o * o for _, o in dims] + [1]

        def compute():
            A, G, count, total = local._factor_sums(self, per_batch)
            return [*A, *G, torch.tensor([float(count)])], total

        parts, total = self._reduce(compute, sizes, f"{type(self).__name__}'s factors")
        count = round(float(parts[-1]))
        if count == 0:
            raise ValueError("no rank holds any data: every shard is empty")
        k = len(dims)
        A = [t.view(d, d) for t, (d, _) in zip(parts[:k], dims)]
        G = [t.view(o, o) for t, (_, o) in zip(parts[k : 2 * k], dims)]
        return A, G, count, total

    def _eigenvalue_sums(self):
        local = _local_class(type(self))
        shapes = [(b.G.shape[0], b.A.shape[0]) for b in self.blocks]

        def compute():
            return local._eigenvalue_sums(self)

        sizes = [o * d for o, d in shapes]
        parts, total = self._reduce(compute, sizes, f"{type(self).__name__}'s eigenvalues")
        if total == 0:
            raise ValueError("no rank holds any data: every shard is empty")
        return [t.view(o, d) for t, (o, d) in zip(parts, shapes)], total


class KFACOperator(_DataParallelKronecker, operators.KFACOperator):
    pass


class EKFACOperator(_DataParallelKronecker, operators.EKFACOperator):
    pass


_KRONECKER_DOC = """
    Same arguments as :class:`hesse.{name}`, with ``data`` this rank's shard (it may be
    empty on some ranks), plus ``group`` and ``timeout`` as
    :class:`hesse.distributed.GGNOperator`. The factors are sums over every rank's
    batches, all-reduced when the operator is made and on :meth:`update` (call it on every
    rank); products and inverses are then local and the same on every rank. With
    ``fisher="mc"`` each rank draws its own labels from rank 0's seed.
"""

for _cls in (KFACOperator, EKFACOperator):
    _base = _local_class(_cls)
    _cls.__doc__ = (
        f"Data-parallel :class:`hesse.{_cls.__name__}`: "
        + (_base.__doc__ or "").strip().split("\n")[0]
        + "\n"
        + _KRONECKER_DOC.format(name=_cls.__name__)
    )


def loss_and_gradient(
    model: nn.Module,
    loss_fn,
    data: Any,
    params=None,
    *,
    io=None,
    group: Any = None,
    timeout: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The mean loss over the union of every rank's shard and its gradient (flat, in the
    order of the operators' vectors), the same on every rank.

    Each rank sums its batches' losses and gradients weighted by their weights
    (:meth:`hesse.func.ModelLoss.weight`: samples, or counted tokens); one
    all-reduce carries the sums and the sample counts. Arguments as
    :class:`hesse.distributed.HessianOperator`.
    """
    comm = as_communicator(group, timeout)
    # A rank that cannot start tells the others (the sizes of the sums must agree).
    fn, batches = comm.attempt(
        lambda: (
            made := ModelLoss(model, loss_fn, params, io),
            _check_data(data, empty_ok=True, io=made.io),
        ),
        "loss_and_gradient()",
        params=lambda made: made[0]._selected,
        flatten=lambda made: made[0].space.flatten(made[0].params()),
    )
    mean = getattr(loss_fn, "reduction", "mean") == "mean"
    size = fn.size
    dtype = fn.space.dtype
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    like = torch.zeros(size + 1, dtype=acc, device=fn.space.device)

    def compute() -> tuple[Tensor, float]:
        ps = fn.params()
        total, n_total = torch.zeros_like(like), 0
        for batch in batches:
            n = fn.weight(batch)
            if n == 0:
                continue
            g, value = grad_and_value(lambda p, b=batch: fn.loss(p, b))(ps)
            w = float(n) if mean else 1.0
            total[:size].add_(fn.space.flatten(g).to(acc), alpha=w)
            total[size] += w * value.detach().to(acc)
            n_total += n
        return total, float(n_total)

    total, n = comm.run_reduced(compute, like, "the gradient")
    if n == 0:
        raise ValueError("no rank holds any data: every shard is empty")
    if mean:
        total = total / n
    check_finite(total, "the loss or its gradient")
    total = total.to(dtype)
    return total[size], total[:size]


def layer_report(
    model: nn.Module,
    loss_fn,
    data: Any,
    *,
    group: Any = None,
    timeout: float | None = None,
    **kwargs,
):
    """:func:`hesse.layer_report` over every rank's shard: each block's Hessian is a
    :class:`HessianOperator` of this module (and with ``kfac=True`` its GGN and KFAC
    blocks are this module's too), so every rank gets the report of one process over all
    the data. Keyword arguments as :func:`hesse.layer_report`."""
    from hesse.analysis._layers import layer_report as local_report

    comm = as_communicator(group, timeout)

    def on(cls):
        return lambda *args, **kw: cls(*args, group=comm, **kw)

    return local_report(
        model,
        loss_fn,
        data,
        _operator=on(HessianOperator),
        _ggn=on(GGNOperator),
        _kfac=on(KFACOperator),
        **kwargs,
    )


__all__ = [
    "EKFACOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "layer_report",
    "loss_and_gradient",
]
