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
        self.comm = as_communicator(group, timeout)

        def make() -> None:  # a rank whose construction fails tells the others at once
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
            self.samples = _check_samples(samples)

        self.comm.attempt(make, f"making a {type(self).__name__}")
        self._steps = self._evals = 0  # the tag of each evaluation: (step, evaluation)
        self._synced = False
        self._step_error: Exception | None = None
        self._uses_batch = 0.0
        self._batch_everywhere = False
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
        # A bad argument on one rank is raised in the step's first collective (the
        # closure's evaluation), so that the others stop there too instead of waiting.
        kept = self.samples
        self._step_error = None
        try:
            if samples is not None:
                self.samples = _check_samples(samples)
        except ValueError as err:
            self._step_error = err
        args, kwargs, error = self._check_step(args, kwargs)
        self._step_error = self._step_error or error
        given = kwargs.get("batch") is not None or (args != () and args[0] is not None)
        self._uses_batch = 1.0 if given and getattr(self, "model", None) is not None else 0.0
        self._steps += 1
        self._evals = 0
        self._sync_parameters()
        # The same on every rank at the start of every step (rank 0's at the first, then
        # the same deterministic update everywhere): the batch operators need not check.
        self.comm.mark_in_sync(self.flat.params)
        try:
            return super().step(closure, *args, **kwargs)
        finally:
            self.samples = kept  # step(samples=n) is for this step only

    def _check_step(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, Exception | None]:
        """Checks of a step's arguments that the local step would raise before its first
        collective: the error, and arguments with which the local step reaches that
        collective (where the error is then raised on every rank)."""
        return args, kwargs, None

    def _operator(self, ev, batch):
        # A rank without data follows the others: the batch curvature (over an empty
        # shard) if they passed batches, the closure's curvature (zero here) if not.
        if self.samples == 0 and self.model is not None:
            batch = [] if self._batch_everywhere else None
        return super()._operator(ev, batch)

    def _subsample(self, batch):
        try:
            return super()._subsample(batch)
        except Exception as err:  # raised when the operator is made, on every rank
            return _Raises(err)

    def _evaluate(self, closure: Closure, graph: bool = False) -> Evaluation:
        flat, comm, w = self.flat, self.comm, float(self.samples)
        P = flat.size
        acc = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
        # [w g, w loss, batch given, holds data]: every rank with data must pass batch=
        # alike, and a rank without data follows them.
        like = torch.zeros(P + 3, dtype=acc, device=flat.device)
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
                buf[P + 2] = 1.0
            return buf, w

        # The tag: this step's number and the evaluation's within it (ranks whose
        # floating-point decisions differed would disagree here, and stop).
        self._evals += 1
        tag = (self._steps % 1024) * 2048 + self._evals % 2048
        total, weight = comm.run_reduced(compute, like, "evaluating the closure", tag)
        with_batch, with_data = float(total[P + 1]), float(total[P + 2])
        if with_batch not in (0.0, with_data):
            if holder:
                holder[0].release()
            raise ValueError(
                "step(closure, batch=...) must be given a batch on every rank that holds "
                "data, or on none (a rank with samples=0 may pass anything)"
            )
        self._batch_everywhere = with_batch > 0
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
        # .grad holds the reduced gradient, as after DistributedDataParallel's backward; on
        # every rank alike, also where this rank's closure left it None (a parameter unused
        # by its shard), so that every rank updates the same parameters.
        for p, gp in zip(flat.params, flat.split(g)):
            if p.grad is not None:
                p.grad.copy_(gp)
            else:
                p.grad = gp.detach().clone()
        return _ReducedEvaluation(loss, g, flat, local, comm, w, weight)

    def _batch_curvature(self, data):
        cls = dp_ops.GGNOperator if self.curvature == "ggn" else dp_ops.HessianOperator
        return cls(
            self.model,
            self.loss_fn,
            data,
            params=self.flat.params,
            io=self.io,
            group=self.comm,  # one Communicator: its counters see all of the step
        )


class _Raises:
    """Stands for data whose preparation failed: the operator's constructor raises the
    error when it reads the data, inside the collective that carries it to the others."""

    def __init__(self, error: Exception):
        self.error = error

    def __iter__(self):
        raise self.error


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

    def _check_step(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, Exception | None]:
        outputs_fn = kwargs.get("outputs_fn", args[0] if args else None)
        refresh = int(self._global()["step"]) % self.update_each == 0
        if self.estimator == "gnb" and refresh and outputs_fn is None:
            error = ValueError(
                "estimator='gnb' needs step(closure, outputs_fn=...) on refresh steps"
            )

            def outputs_fn():  # never called: the step stops at its first collective
                raise error

            return (), {**kwargs, "outputs_fn": outputs_fn}, error
        return args, kwargs, None

    def _gnb(self, outputs_fn) -> list[Tensor]:
        flat, comm = self.flat, self.comm
        like = torch.zeros(
            flat.size,
            dtype=torch.float32 if flat.dtype not in (torch.float32, torch.float64) else flat.dtype,
            device=flat.device,
        )
        step = int(self._global()["step"])
        labels = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step + 7_777_777 * (comm.rank + 1)) % 2**63
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
        return [d.to(flat.dtype) for d in self._gnb_estimate(flat.split(g), b)]


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

    def _check_step(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, Exception | None]:
        batch = kwargs.get("batch", args[0] if args else None)
        update = int(self.global_state().get("step", 0)) % self.param_groups[0]["update_each"]
        on_batch = update == 0 and self.loss_fn is not None and batch is not None
        if self.samples > 0:  # a rank without data follows the others
            return args, kwargs, super()._batch_error(update == 0, on_batch)
        return args, kwargs, None

    def _batch_error(self, update: bool, on_batch: bool) -> ValueError | None:
        return None  # raised in the step's first collective (see _check_step)

    def _factors_on_batch(self, update: bool, on_batch: bool) -> bool:
        return update and self.loss_fn is not None and self._batch_everywhere

    def _batch_operator(self, model, loss_fn, batch, *args, **kwargs):
        if batch is None:  # this rank holds no data (samples=0)
            batch = []
        return dp_ops.KFACOperator(model, loss_fn, batch, *args, group=self.comm, **kwargs)

    def _update_factors(self, seen: dict[str, list], group: dict) -> None:
        layers = self._layers
        sizes = [n for la in layers for n in (la.d * la.d, la.out * la.out, 1)]
        acc = self.flat.dtype
        acc = acc if acc in (torch.float32, torch.float64) else torch.float32
        like = torch.zeros(sum(sizes), dtype=acc, device=self.flat.device)
        w = float(self.samples)

        def compute() -> tuple[Tensor, float]:
            factors = self._closure_factors(seen, group) if w > 0 else {}
            parts = []
            for la in layers:
                a, g = factors.get(la.name, (None, None))
                if a is None:  # the layer took no part here: zeros, and no weight
                    parts += [like.new_zeros(la.d * la.d), like.new_zeros(la.out * la.out)]
                    parts.append(like.new_zeros(1))
                else:
                    parts += [a.reshape(-1).to(acc) * w, g.reshape(-1).to(acc) * w]
                    parts.append(like.new_full((1,), w))
            return (torch.cat(parts) if parts else like), w

        total, _ = self.comm.run_reduced(compute, like, "KFAC's factors")
        chunks = total.to(self.flat.dtype).split(sizes)
        factors = {}
        for j, la in enumerate(layers):
            a, g, weight = chunks[3 * j : 3 * j + 3]
            if float(weight) > 0:
                factors[la.name] = (
                    (a / weight).view(la.d, la.d),
                    (g / weight).view(la.out, la.out),
                )
        self._average_in(factors, group["factor_decay"])
