"""hesse's optimizers with each rank's closure on its own shard of the data: the classes of
:mod:`hesse.optim` themselves, given a reducer over the process group
(:class:`~hesse.distributed._reducer.DataParallelReducer`) instead of the identity."""

from __future__ import annotations

from typing import Any

import torch

from hesse import optim
from hesse.distributed._comm import as_communicator
from hesse.distributed._reducer import DataParallelReducer
from hesse.optim._base import Closure, FlatOptimizer


class _DataParallelOptimizer(FlatOptimizer):
    """Mixin: the local optimizer with a :class:`DataParallelReducer`, so that every
    evaluation of the closure (which computes this rank's loss on its shard), every
    curvature product and every mean the optimizer takes is reduced to the
    sample-weighted mean over ranks, and the optimizer takes the same step on every rank
    as one process on all the data would. It overrides no method of the local class but
    the constructor and ``step`` (for ``samples=`` and the first step's parameters)."""

    #: Whether ``step``'s argument after the closure is the batch (``batch=``).
    _batch_arg = False

    def __init__(
        self,
        params,
        *args,
        samples: int,
        group: Any = None,
        timeout: float | None = None,
        **kwargs,
    ):
        self.comm = as_communicator(group, timeout)

        def make() -> int:  # a rank whose construction fails tells the others at once
            ddp = torch.nn.parallel.DistributedDataParallel
            if isinstance(kwargs.get("model"), ddp) or isinstance(params, ddp):
                raise ValueError(
                    "hesse.distributed's optimizers reduce gradients and curvature "
                    "themselves: pass the plain model (ddp.module), and call it, not the "
                    "DistributedDataParallel wrapper, in the closure (DDP would average the "
                    "gradients a second time, unweighted, and does not support double "
                    "backward)"
                )
            super(_DataParallelOptimizer, self).__init__(params, *args, **kwargs)
            return _check_samples(samples)

        count = self.comm.attempt(make, f"making a {type(self).__name__}")
        self._reducer = DataParallelReducer(self.comm, count)
        self._synced = False
        if "seed" in self.param_groups[0]:  # probes and subsamples: rank 0's seed everywhere
            seed = torch.tensor([int(self.param_groups[0]["seed"])], dtype=torch.int64)
            seed = int(self.comm.broadcast_(seed, "sharing the optimizer's seed"))
            for g in self.param_groups:
                g["seed"] = seed

    @property
    def samples(self) -> int:
        """The number of samples this rank's closure averages over."""
        return self._reducer.samples

    @samples.setter
    def samples(self, value: int) -> None:
        self._reducer.samples = _check_samples(value)

    def _sync_parameters(self) -> None:
        """Give every rank rank 0's parameters, once, before the first step (as
        ``DistributedDataParallel`` does when it wraps a model)."""
        if self._synced:
            return
        flat = self.flat
        self.comm.check_size(flat.size, "the optimizer's parameters")
        x = flat.get()
        flat.set(self.comm.broadcast_(x, "sharing rank 0's parameters"))
        self._synced = True

    def step(self, closure: Closure | None = None, *args, samples: int | None = None, **kwargs):
        """As the local optimizer's ``step``; ``samples`` overrides, for this step, the
        number of samples this rank's closure averages over (e.g. a short last batch).
        With ``model``/``loss_fn``, pass ``batch=`` on every rank; a rank with
        ``samples=0`` may pass ``batch=None`` (it holds nothing)."""
        reducer = self._reducer
        kept = reducer.samples
        # A bad argument on one rank is raised in the step's first collective (the
        # closure's evaluation), so that the others stop there too instead of waiting.
        error = None
        try:
            if samples is not None:
                reducer.samples = _check_samples(samples)
        except ValueError as err:
            error = err
        given = False
        if self._batch_arg:
            batch = args[0] if args else kwargs.get("batch")
            given = batch is not None and getattr(self, "model", None) is not None
            if batch is None and reducer.samples == 0:  # no data here: an empty batch
                if args:
                    args = ([], *args[1:])
                else:
                    kwargs["batch"] = []
        reducer.begin_step(given, error)
        self._sync_parameters()
        # The same on every rank at the start of every step (rank 0's at the first, then
        # the same deterministic update everywhere): the batch operators need not check.
        self.comm.mark_in_sync(self.flat.params)
        try:
            return super().step(closure, *args, **kwargs)
        finally:
            reducer.samples = kept  # step(samples=n) is for this step only


def _check_samples(samples: object) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(
            "samples must be the number of samples this rank's closure averages its loss "
            f"over (an integer >= 0), got {samples!r}"
        )
    return samples


_DOC = """Data-parallel :class:`hesse.optim.{name}`: each rank's closure computes the mean
    loss over its own shard; every evaluation (loss, gradient, and the Hessian-vector
    products through the closure's graph) is reduced across ranks, weighted by
    ``samples``, in one all-reduce. With ``model``/``loss_fn``, the curvature on
    ``step(closure, batch=...)`` is a :mod:`hesse.distributed` operator over every rank's
    batch. All ranks take the same step: the one a single process takes on all the data.

    Same arguments as :class:`hesse.optim.{name}`, plus (keyword-only):

    Args:
        samples: the number of samples this rank's closure averages over (ranks are
            weighted by it; 0 for a rank without data). ``step(..., samples=n)`` changes it.
        group: the ``torch.distributed`` process group (default: the world).
        timeout: seconds a rank waits for the others in one collective before raising
            :class:`~hesse.distributed.RankError` (default 300).

    On its first step the optimizer gives every rank rank 0's parameters (as
    ``DistributedDataParallel`` does); its seed is rank 0's. The closure's loss must be a
    mean over ``samples`` samples (``reduction="mean"``). With ``model``/``loss_fn``, pass
    ``batch=`` on every rank (a rank with ``samples=0`` may pass ``None``); a
    ``subsample`` is drawn on each rank from its own batch (an int is per rank, a fraction
    of each rank's batch), at positions that differ between ranks.
"""


class LBFGS(_DataParallelOptimizer, optim.LBFGS):
    __doc__ = _DOC.format(name="LBFGS")


class HessianFree(_DataParallelOptimizer, optim.HessianFree):
    __doc__ = _DOC.format(name="HessianFree")
    _batch_arg = True


class SubsampledNewton(_DataParallelOptimizer, optim.SubsampledNewton):
    __doc__ = _DOC.format(name="SubsampledNewton")
    _batch_arg = True


class NewtonCG(_DataParallelOptimizer, optim.NewtonCG):
    __doc__ = _DOC.format(name="NewtonCG")
    _batch_arg = True


class AdaHessian(_DataParallelOptimizer, optim.AdaHessian):
    __doc__ = _DOC.format(name="AdaHessian")


class Sophia(_DataParallelOptimizer, optim.Sophia):
    __doc__ = (
        _DOC.format(name="Sophia")
        + """
    With ``estimator="gnb"``, each rank samples labels for its own batch (``outputs_fn``
    gives this rank's logits; a rank without data returns a ``(0, classes)`` tensor); the
    sampled-label gradients are averaged over ranks by batch size before they are
    squared, so the estimate is :math:`B\\, \\hat g \\odot \\hat g` over all ``B`` samples.
"""
    )


class KFAC(_DataParallelOptimizer, optim.KFAC):
    __doc__ = (
        _DOC.format(name="KFAC")
        + """
    The Kronecker factors are reduced as kfac-pytorch and KAISA reduce them: on the steps
    that refresh them, each rank's factors (from its closure's pass, or with ``loss_fn``
    those of a :class:`hesse.distributed.KFACOperator` over every rank's batch) are
    all-reduced, weighted by ``samples``, in one collective; the running averages, the
    eigendecompositions and the step are then the same on every rank: those of one
    process on all the data.
"""
    )
    _batch_arg = True
