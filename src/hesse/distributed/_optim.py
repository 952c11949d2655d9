"""hesse's optimizers with each rank's closure on its own shard of the data."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hesse import optim
from hesse.distributed import _operators as dp_ops
from hesse.distributed._comm import Communicator, as_communicator
from hesse.optim._base import Closure, Evaluation, FlatOptimizer, FlatParams, evaluate


class _ReducedEvaluation(Evaluation):
    """An evaluation whose loss and gradient are the sample-weighted means over ranks, and
    whose Hessian-vector products (through each rank's kept graph) are reduced alike."""

    def __init__(
        self,
        loss: float,
        g: Tensor | None,
        flat: FlatParams,
        local: Evaluation | None,
        comm: Communicator,
        weight: float,
        total_weight: float,
    ):
        super().__init__(loss, None if g is None else flat.split(g), None)
        self._g = g
        self._local, self._flat, self._comm = local, flat, comm
        self._weight, self._total = weight, total_weight

    def hvp_list(self, vs: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        local, w = self._local, self._weight
        like = torch.cat([v.reshape(-1) for v in vs])
        dtype = like.dtype
        if dtype not in (torch.float32, torch.float64):
            like = like.float()  # weighted by sample counts: float16 would overflow

        def compute() -> tuple[Tensor, float]:
            if local is None or w == 0:  # this rank holds no data in this step
                return torch.zeros_like(like), w
            out = local.hvp_list(vs, params)
            return torch.cat([h.reshape(-1) for h in out]).to(like.dtype).mul_(w), w

        total, _ = self._comm.run_reduced(compute, like, "a Hessian-vector product")
        return self._flat.split(total.div_(self._total).to(dtype))

    def release(self) -> None:
        if self._local is not None:
            self._local.release()


class _DataParallelOptimizer(FlatOptimizer):
    """Mixin: every evaluation of the closure (which computes this rank's loss on its
    shard) is reduced to the sample-weighted mean over ranks, so the optimizer takes the
    same step on every rank as one process on all the data would."""

    def __init__(
        self,
        params,
        *args,
        samples: int,
        group: Any = None,
        timeout: float | None = None,
        **kwargs,
    ):
        if isinstance(kwargs.get("model"), torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                "hesse.distributed's optimizers reduce gradients and curvature themselves: "
                "pass the plain model (ddp.module), and call it, not the "
                "DistributedDataParallel wrapper, in the closure (DDP would average the "
                "gradients a second time, unweighted, and does not support double backward)"
            )
        super().__init__(params, *args, **kwargs)
        self.comm = as_communicator(group, timeout)
        self.samples = _check_samples(samples)
        self._synced = False
        self._step_error: Exception | None = None
        self._uses_batch = 0.0
        if hasattr(self, "seed"):  # probes and subsamples: rank 0's seed everywhere
            seed = torch.tensor([int(self.seed)], dtype=torch.int64)
            self.seed = int(self.comm.broadcast_(seed, "sharing the optimizer's seed"))
            # A subsample draws other positions on each rank (1_000_003: a prime).
            self._seed_offset = 1_000_003 * self.comm.rank

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
        self._step_error = None
        try:  # a bad argument on one rank is raised in the step's first collective
            if samples is not None:
                self.samples = _check_samples(samples)
        except ValueError as err:
            self._step_error = err
        if getattr(self, "model", None) is not None:
            if kwargs.get("batch") is None and (args == () or args[0] is None):
                if self.samples == 0:
                    kwargs["batch"], args = [], ()
            given = kwargs.get("batch") is not None or (args != () and args[0] is not None)
            self._uses_batch = 1.0 if given else 0.0
        self._sync_parameters()
        # The same on every rank at the start of every step (rank 0's at the first, then
        # the same deterministic update everywhere): the batch operators need not check.
        self.comm.mark_in_sync(self.flat.params)
        return super().step(closure, *args, **kwargs)

    def _evaluate(self, closure: Closure, graph: bool = False) -> Evaluation:
        flat, comm, w = self.flat, self.comm, float(self.samples)
        P = flat.size
        acc = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
        # [w g, w loss, batch flag]: the flag checks that every rank passes batch= alike.
        like = torch.zeros(P + 2, dtype=acc, device=flat.device)
        holder: list[Evaluation] = []

        def compute() -> tuple[Tensor, float]:
            if self._step_error is not None:
                raise self._step_error
            buf = torch.zeros_like(like)
            if w > 0:  # (a rank without data in this step contributes nothing)
                ev = evaluate(closure, flat, graph)
                holder.append(ev)
                if ev.grads is None:
                    buf[: P + 1] = math.nan
                else:
                    buf[:P] = ev.g
                    buf[P] = ev.loss
                buf[: P + 1].mul_(w)
            buf[P + 1] = self._uses_batch
            return buf, w

        total, weight = comm.run_reduced(compute, like, "evaluating the closure")
        if float(total[P + 1]) not in (0.0, float(comm.world)):
            if holder:
                holder[0].release()
            raise ValueError(
                "step(closure, batch=...) must be given a batch on every rank or on none "
                "(a rank with samples=0 may pass batch=None)"
            )
        if weight == 0:
            raise ValueError("no rank holds any data: samples is 0 on every rank")
        total = total[: P + 1].div_(weight).to(flat.dtype)
        loss = float(total[-1])
        g = total[:-1]
        finite = math.isfinite(loss) and bool(torch.isfinite(g).all())
        local = holder[0] if holder else None
        if not finite:
            if local is not None:
                local.release()
            return Evaluation(loss, None, None)
        # .grad holds the reduced gradient, as after DistributedDataParallel's backward.
        for p, gp in zip(flat.params, flat.split(g)):
            if p.grad is not None:
                p.grad.copy_(gp)
        return _ReducedEvaluation(loss, g, flat, local, comm, w, weight)

    def _batch_curvature(self, data):
        cls = dp_ops.GGNOperator if self.curvature == "ggn" else dp_ops.HessianOperator
        return cls(
            self.model,
            self.loss_fn,
            data,
            params=self.flat.params,
            group=self.comm,  # one Communicator: its counters see all of the step
        )


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


class SubsampledNewton(_DataParallelOptimizer, optim.SubsampledNewton):
    __doc__ = _DOC.format(name="SubsampledNewton")


class NewtonCG(_DataParallelOptimizer, optim.NewtonCG):
    __doc__ = _DOC.format(name="NewtonCG")


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

    def _gnb(self, outputs_fn) -> list[Tensor]:
        flat, comm = self.flat, self.comm
        like = torch.zeros(
            flat.size,
            dtype=torch.float32 if flat.dtype not in (torch.float32, torch.float64) else flat.dtype,
            device=flat.device,
        )
        step = int(self._global()["step"])
        labels = torch.Generator().manual_seed(
            self.seed * 1_000_003 + step + 7_777_777 * (comm.rank + 1)
        )  # each rank draws its own labels

        def compute() -> tuple[Tensor, float]:
            grads, b = self._gnb_gradient(outputs_fn, labels)
            if b == 0:
                return torch.zeros_like(like), 0.0
            g = torch.cat([t.reshape(-1) for t in grads]).to(like.dtype)
            return g.mul_(b), float(b)

        total, b = comm.run_reduced(compute, like, "Sophia's Gauss-Newton-Bartlett estimate")
        if b == 0:
            raise ValueError("no rank holds any data: every outputs_fn() returned 0 rows")
        g = total.div_(b)
        return [(b * t * t).to(flat.dtype) for t in flat.split(g)]
