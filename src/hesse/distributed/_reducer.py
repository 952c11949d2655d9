"""The reducer that makes hesse's optimizers data-parallel: at each point where the
optimizers of :mod:`hesse.optim` call their :class:`~hesse.optim._base.Reducer`, one
collective over the ranks of a process group (see that class for the points)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hesse.distributed import _operators as dp_ops
from hesse.distributed._comm import Communicator, site
from hesse.optim._base import Closure, Evaluation, FlatParams, Reducer, evaluate


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums weighted by sample counts are taken in (float16 would overflow)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class DataParallelReducer(Reducer):
    """The reducer of one rank of a data-parallel optimizer: each rank's closure computes
    the mean loss over its own shard of ``samples`` samples; every evaluation, product and
    mean is reduced to the sample-weighted mean over ranks, so that every rank takes the
    step one process on all the data takes.

    Each collective is tagged with its call site's name, the step's number and the call's
    number within the step for that name (:meth:`tag`): ranks that took different paths
    stop with a :class:`~hesse.distributed.RankError` naming where each one was."""

    sharded = True

    def __init__(self, comm: Communicator, samples: int):
        self.comm = comm
        self.samples = samples
        self._step = 0
        self._calls: dict[str, int] = {}
        self._given = 0.0
        self._everywhere = False

    # -- the step -----------------------------------------------------------------------
    def begin_step(self, batch_given: bool, error: Exception | None = None) -> None:
        """A step starts: whether this rank was given a batch (every rank that holds data
        must say the same, which the step's first evaluation checks), and an error found
        in its arguments, raised in the step's first collective (where the other ranks
        learn of it)."""
        self._step += 1
        self._calls = {}
        self._given = 1.0 if batch_given else 0.0
        self.comm.defer(error)

    def tag(self, name: str) -> tuple[int, int, int]:
        """The tag of the next collective made at the call site ``name``: the site, the
        step and the number of this site's calls in the step so far."""
        n = self._calls.get(name, 0) + 1
        self._calls[name] = n
        return site(name), self._step % 2**20, n % 2**20

    # -- the points of the protocol ------------------------------------------------------
    def evaluate(self, name: str, closure: Closure, flat: FlatParams, graph: bool = False):
        comm, w = self.comm, float(self.samples)
        P = flat.size
        # [w g, w loss, batch given, holds data]: every rank with data must pass batch=
        # alike, and a rank without data follows them.
        like = torch.zeros(P + 3, dtype=_accumulator(flat.dtype), device=flat.device)
        holder: list[Evaluation] = []

        def compute() -> tuple[Tensor, float]:
            buf = torch.zeros_like(like)
            if w > 0:  # (a rank without data in this step contributes nothing)
                ev = evaluate(closure, flat, graph)
                holder.append(ev)
                if ev.grads is None:
                    buf[: P + 1] = math.nan
                else:
                    buf[:P] = ev.g
                    buf[P] = ev.f
                buf[: P + 1].mul_(w)
                buf[P + 1] = self._given
                buf[P + 2] = 1.0
            return buf, w

        total, weight = comm.run_reduced(
            compute, like, f"evaluating the closure ({name})", self.tag(name)
        )
        with_batch, with_data = float(total[P + 1]), float(total[P + 2])
        if with_batch not in (0.0, with_data):
            if holder:
                holder[0].release()
            raise ValueError(
                "step(closure, batch=...) must be given a batch on every rank that holds "
                "data, or on none (a rank with samples=0 may pass anything)"
            )
        self._everywhere = with_batch > 0
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
            return Evaluation(loss, None, None, flat.params)
        # .grad holds the reduced gradient, as after DistributedDataParallel's backward; on
        # every rank alike, also where this rank's closure left it None (a parameter unused
        # by its shard), so that every rank updates the same parameters.
        for p, gp in zip(flat.params, flat.split(g)):
            if p.grad is not None:
                p.grad.copy_(gp)
            else:
                p.grad = gp.detach().clone()
        return _ReducedEvaluation(loss, g, flat, local, self, name, w, weight)

    def batch(self, batch: object) -> object:
        if self.samples == 0:  # no data here: an empty shard where the others have batches
            return [] if self._everywhere else None
        return batch

    def operator(self, cls: type, *args, **kwargs):
        twin = getattr(dp_ops, cls.__name__, None)
        if not (isinstance(twin, type) and issubclass(twin, cls)):
            raise TypeError(f"hesse.distributed has no data-parallel {cls.__name__}")
        return twin(*args, group=self.comm, **kwargs)  # one Communicator for the whole step

    def mean(
        self,
        name: str,
        compute: Callable[[], tuple[list[Tensor | None], float | None]],
        like: list[Tensor],
    ) -> tuple[list[Tensor | None], float]:
        acc = _accumulator(like[0].dtype) if like else torch.float64
        device = like[0].device if like else torch.device("cpu")
        sizes = [t.numel() for t in like]
        k = len(like)
        # [w t for each tensor (zeros where this rank has no part), w per tensor (0 there)]
        buf = torch.zeros(sum(sizes) + k, dtype=acc, device=device)

        def run() -> tuple[Tensor, float]:
            tensors, weight = compute()
            w = float(self.samples if weight is None else weight)
            parts, present = [], []
            for t, ref in zip(tensors, like, strict=True):
                if t is None or w == 0:
                    parts.append(ref.new_zeros(ref.numel(), dtype=acc))
                    present.append(0.0)
                else:
                    parts.append(t.reshape(-1).to(acc) * w)
                    present.append(w)
            parts.append(torch.tensor(present, dtype=acc, device=device))
            return torch.cat(parts), w

        total, weight = self.comm.run_reduced(run, buf, name, self.tag(name))
        chunks = total[: sum(sizes)].split(sizes)
        weights = total[sum(sizes) :].tolist()
        means = [
            (c / wt).to(ref.dtype).view(ref.shape) if wt > 0 else None
            for c, wt, ref in zip(chunks, weights, like)
        ]
        return means, weight

    def attempt(self, name: str, fn: Callable, *args):
        return self.comm.attempt(lambda: fn(*args), name, tag=self.tag(name))

    def check(self, name: str, error: Exception | None) -> None:
        self.comm.defer(error)  # raised in this rank's next collective, where all learn of it

    def shard_seed(self, seed: int) -> int:
        return self.comm.shard_seed(seed)


class _ReducedEvaluation(Evaluation):
    """An evaluation whose loss and gradient are the sample-weighted means over ranks, and
    whose Hessian-vector products (through each rank's kept graph) are reduced alike."""

    def __init__(
        self,
        loss: float,
        g: Tensor,
        flat: FlatParams,
        local: Evaluation | None,
        reducer: DataParallelReducer,
        name: str,
        weight: float,
        total_weight: float,
    ):
        super().__init__(loss, flat.split(g), None, flat.params)
        self._g = g
        self.hvp = self._flat_hvp  # every rank takes part in each product (reduced)
        self._local, self._flat, self._reducer = local, flat, reducer
        self._name = f"{name}: a Hessian-vector product"
        self._weight, self._total = weight, total_weight

    def hvp_list(self, vs: list[Tensor], params: list[Tensor] | None = None) -> list[Tensor]:
        local, w = self._local, self._weight
        like = torch.cat([v.reshape(-1) for v in vs])
        dtype = like.dtype
        like = like.to(_accumulator(dtype))  # weighted by sample counts

        def compute() -> tuple[Tensor, float]:
            if local is None or w == 0:  # this rank holds no data in this step
                return torch.zeros_like(like), w
            out = local.hvp_list(vs, params)
            return torch.cat([h.reshape(-1) for h in out]).to(like.dtype).mul_(w), w

        reducer = self._reducer
        total, _ = reducer.comm.run_reduced(compute, like, self._name, reducer.tag(self._name))
        return self._flat.split(total.div_(self._total).to(dtype))

    def release(self) -> None:
        if self._local is not None:
            self._local.release()
