"""The collectives hesse's data-parallel pieces use: a weighted sum across ranks that also
carries each rank's failure, broadcasts, and timeouts that turn a dead or silent rank into
a clear error instead of a hang."""

from __future__ import annotations

import datetime
import math
import time
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from hesse._core._checks import derive_seed

#: Seconds a rank waits for the others in one collective before it gives up (override per
#: object with ``timeout=``, or for the process with :func:`set_default_timeout`).
DEFAULT_TIMEOUT = 300.0

_default_timeout = DEFAULT_TIMEOUT

T = TypeVar("T")

# Sample counts travel in the reduced buffer as two base-2^12 digits, so that they stay
# exact in float32 (whose integers are exact to 2^24) for totals up to 2^36 samples.
_DIGIT = 4096.0


#: The names of the call sites that tag collectives, by the number that stands for each in
#: a tag (:func:`site`), so that an out-of-step error names where each rank was.
_SITES: dict[int, str] = {}


def site(name: str) -> int:
    """The number (< 2**20, exact in float32) that stands for the call site ``name`` in a
    collective's tag; the same in every process (a CRC-32 of the name, not ``hash``)."""
    number = zlib.crc32(name.encode("utf-8")) % 2**20
    _SITES.setdefault(number, name)
    return number


def _where(tag: list[int]) -> str:
    """Where a tag says a rank was (a call site this process has not tagged itself is
    named by its number). Step 0 is no step: the operators' collectives
    (:meth:`Communicator.tag`) count their calls over the communicator's life."""
    number, step, call = tag
    if number == 0 and step == 0:
        return f"collective {call}"
    name = repr(_SITES[number]) if number in _SITES else f"call site #{number}"
    return f"{name} (call {call})" if step == 0 else f"{name} (call {call} of step {step})"


def _check_in_step(rank: int, world: int, tags: list[list[int]], what: str) -> None:
    """Raise (on every rank alike) a :class:`RankError` saying where each rank was, unless
    every rank's tag is the same."""
    if any(t != tags[0] for t in tags):
        where = "; ".join(f"rank {r} at {_where(t)}" for r, t in enumerate(tags))
        raise RankError(
            f"rank {rank} of {world}: the ranks are out of step in {what} ({where}): they "
            "took different paths; run every rank with the same software, thread count "
            "and optimizer state"
        )


class RankError(RuntimeError):
    """Another rank of a data-parallel computation failed, exited or did not answer in
    time, so this rank stops too. The failing rank raises its own error."""


def set_default_timeout(seconds: float) -> None:
    """Set the timeout (in seconds) of hesse's collectives for objects made afterwards
    without ``timeout=``."""
    global _default_timeout
    _default_timeout = _check_timeout(seconds)


def _check_timeout(seconds: object) -> float:
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not ok or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("hesse.distributed needs torch.distributed, which this torch lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "hesse.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group(backend) first (torchrun sets the "
            "environment it reads; 'gloo' for CPU tensors, 'nccl' for CUDA tensors)"
        )
    return dist


class Communicator:
    """The ranks of one process group, as hesse's data-parallel objects use them.

    Args:
        group: a ``torch.distributed`` process group (default: the whole world).
        timeout: seconds to wait in one collective before raising :class:`RankError`
            (default :func:`set_default_timeout`'s value, 300 s).

    ``seconds`` and ``calls`` count the time spent in (and the number of) collectives, for
    profiling communication.

    Every collective that compares the ranks' places (:meth:`sum_weighted` and what is
    built on it, :meth:`check_operand`) is tagged with its call site: by default its own
    description (``what``) and the number of this communicator's calls there
    (:meth:`tag`); an optimizer's reducer passes its site, step and call instead. Ranks
    that took different paths stop with a :class:`RankError` naming where each one was.
    """

    def __init__(self, group: Any = None, timeout: float | None = None):
        dist = _dist()
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = _default_timeout if timeout is None else _check_timeout(timeout)
        self.seconds = 0.0
        self.calls = 0
        self._pending: BaseException | None = None
        self._site_calls: dict[str, int] = {}

    def _device(self, tensor: Tensor) -> torch.device:
        """Where a tensor must be for this backend (nccl reduces CUDA tensors only)."""
        if self.backend == "nccl" and tensor.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def _run(self, what: str, launch: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            work = launch()
            if self.backend == "gloo":
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
            else:
                # nccl's wait() only orders the CUDA stream (unless TORCH_NCCL_BLOCKING_WAIT
                # is set): poll for completion up to the deadline ourselves.
                deadline = start + self.timeout
                pause = 1e-5
                while not work.is_completed():
                    if time.perf_counter() > deadline:
                        raise TimeoutError("Operation timed out!")
                    time.sleep(pause)
                    pause = min(2 * pause, 1e-3)
                work.wait()
        except RankError:
            raise
        except Exception as err:
            raise RankError(
                f"rank {self.rank} of {self.world}: {what} did not complete: another rank "
                f"exited, crashed or did not answer within {self.timeout:g} s ({err})"
            ) from err
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def tag(self, name: str) -> tuple[int, int, int]:
        """The tag of the next collective at the call site ``name`` outside an optimizer's
        step (a product, an operand check, a factor sum, the making of an operator...):
        the site (:func:`site`), step 0 (none) and the number of this communicator's
        calls at that site so far, itself included."""
        n = self._site_calls.get(name, 0) + 1
        self._site_calls[name] = n
        return site(name), 0, n % 2**20

    def defer(self, error: BaseException | None) -> None:
        """Raise ``error`` (found by this rank before a collective) in this rank's next
        collective (:meth:`sum_weighted`, :meth:`run_reduced`, :meth:`attempt`), where the
        other ranks learn of it and raise a :class:`RankError`, rather than now, which
        would leave them waiting in that collective. Until then this rank's local work in
        those collectives is skipped. ``None``: nothing to defer."""
        if error is not None and self._pending is None:
            self._pending = error

    def shard_seed(self, seed: int) -> int:
        """The seed of random draws from data only this rank holds (a subsample of its
        shard, labels sampled for it): rank 0's is ``seed`` itself, so that one rank draws
        what one process draws; another rank's is derived from ``seed`` and the rank
        (:func:`~hesse._core._checks.derive_seed`), so that the shards draw independently."""
        return seed if self.rank == 0 else derive_seed(seed, "rank", self.rank)

    def sum_weighted(
        self,
        local: Tensor,
        weight: float,
        error: BaseException | None,
        what: str,
        tag: int | tuple[int, int, int] | None = None,
    ) -> tuple[Tensor, float]:
        """``(sum over ranks of local, sum over ranks of weight)``, in one all-reduce.

        ``local`` is this rank's already-weighted partial sum. A rank whose local work
        failed passes ``error`` (and any ``local`` of the right shape), or has deferred one
        (:meth:`defer`): the collective still completes, so nobody hangs; that rank then
        raises its own error and every other rank a :class:`RankError` naming it.

        ``tag`` says where the caller is in its own sequence: ``(site(name), step, call)``
        (an optimizer's reducer passes its call site, the step and the call's number
        within the step), or an integer; by default the call site ``what`` and its call's
        number on this communicator (:meth:`tag`). Ranks whose tags differ are out of
        step: they took different paths, and every rank raises a :class:`RankError`
        saying where each one was.
        """
        if error is None and self._pending is not None:
            error, self._pending = self._pending, None
        dtype = local.dtype if local.dtype in (torch.float32, torch.float64) else torch.float32
        # [count (2 digits), failure flag per rank, this call's tag (3 numbers) per rank]
        extra = torch.zeros(2 + 4 * self.world, dtype=dtype, device=local.device)
        hi = math.floor(weight / _DIGIT)
        extra[0], extra[1] = hi, weight - hi * _DIGIT
        if error is not None:
            extra[2 + self.rank] = 1.0
        if tag is None:
            tag = self.tag(what)
        elif isinstance(tag, int):
            tag = (0, 0, tag)
        mine = 2 + self.world + 3 * self.rank
        for j, number in enumerate(tag):
            extra[mine + j] = number % 2**22  # exact in float32
        buf = torch.cat([local.reshape(-1).to(dtype), extra])
        device = self._device(buf)
        buf = buf.to(device)
        self._run(what, lambda: self._dist.all_reduce(buf, group=self.group, async_op=True))
        buf = buf.to(local.device)
        n = local.numel()
        extra = buf[n:].tolist()
        if error is not None:
            raise error
        failed = [r for r in range(self.world) if extra[2 + r] > 0]
        if failed:
            raise RankError(
                f"rank {self.rank} of {self.world}: {what} failed on rank(s) {failed} (see "
                "their own errors); this rank stops too"
            )
        tags = [[int(c) for c in extra[2 + self.world + 3 * r : 5 + self.world + 3 * r]]
                for r in range(self.world)]  # fmt: skip
        _check_in_step(self.rank, self.world, tags, what)
        return buf[:n].reshape(local.shape).to(local.dtype), extra[0] * _DIGIT + extra[1]

    def check_operand(self, x: Tensor, what: str, tag: tuple[int, int, int] | None = None) -> None:
        """Raise (on every rank alike) unless ``x`` has the same shape and, up to rounding,
        the same values on every rank: one small all-reduce before a product's, whose
        buffer sizes must agree (gloo aborts the process on a mismatch) and whose sum is
        meaningless if the ranks multiplied different vectors.

        The values are compared through a checksum (the sum of ``x``, a position-weighted
        sum, and the sum of its magnitudes, in float64), not element by element: cheap
        for any size, and blind only to differences of the order of rounding. The same
        buffer carries each rank's tag (by default the call site "the operands of
        ``what``", :meth:`tag`): ranks at different places raise a :class:`RankError`
        saying where each one was (a rank one product ahead is caught here)."""
        where = f"the operands of {what}"
        tag = self.tag(where) if tag is None else tag
        flat = x.detach().reshape(-1)
        n = flat.numel()
        ramp = torch.linspace(1.0, 2.0, n, dtype=flat.dtype, device=flat.device)
        mine = [
            float(n),
            float(x.shape[-1]) if x.dim() else 1.0,
            float(flat.sum(dtype=torch.float64)),
            float((flat * ramp).sum(dtype=torch.float64)),
            float(flat.abs().sum(dtype=torch.float64)),
            *(float(number % 2**22) for number in tag),
        ]
        k = len(mine)
        buf = torch.zeros(k * self.world, dtype=torch.float64)
        buf[k * self.rank : k * (self.rank + 1)] = torch.tensor(mine, dtype=torch.float64)
        dev = buf.to(self._device(buf))
        self._run(
            f"comparing {where}",
            lambda: self._dist.all_reduce(dev, group=self.group, async_op=True),
        )
        rows = dev.cpu().reshape(self.world, k).tolist()
        _check_in_step(self.rank, self.world, [[int(c) for c in r[5:]] for r in rows], where)
        sizes = [(int(r[0]), int(r[1])) for r in rows]
        if any(sz != sizes[0] for sz in sizes):
            raise ValueError(
                f"{what}: the ranks multiply operands of different sizes (elements, columns "
                f"per rank: {sizes}); every rank must apply the operator to the same vectors "
                "(the same k columns, the same trace or eigenvalue budget)"
            )
        scale = max(abs(r[4]) for r in rows)
        tol = 1e-7 * scale if math.isfinite(scale) else 0.0

        def same(a: float, b: float) -> bool:
            return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= tol

        if not all(same(r[j], rows[0][j]) for r in rows for j in (2, 3, 4)):
            raise ValueError(
                f"{what}: the ranks multiply different vectors (their checksums differ); "
                "every rank must apply the operator to the same vectors: draw random ones "
                "from a generator seeded alike on every rank, or pass a seed"
            )

    def run_reduced(
        self,
        compute: Callable[[], tuple[Tensor, float]],
        like: Tensor,
        what: str,
        tag: int | None = None,
    ) -> tuple[Tensor, float]:
        """Run this rank's part (``compute() -> (weighted local sum, weight)``) and reduce
        it; an exception in ``compute`` is carried through the collective (see
        :meth:`sum_weighted`) rather than leaving the other ranks waiting."""
        if self._pending is not None:  # raised in the collective: no local work before it
            return self.sum_weighted(torch.zeros_like(like), 0.0, None, what, tag)
        try:
            local, weight = compute()
            error = None
        except Exception as err:  # carried to the other ranks, then re-raised here
            local, weight, error = torch.zeros_like(like), 0.0, err
        return self.sum_weighted(local, weight, error, what, tag)

    def broadcast_(self, tensor: Tensor, what: str, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s (in place; returned)."""
        buf = tensor if self._device(tensor) == tensor.device else tensor.to(self._device(tensor))
        src_global = self._dist.get_global_rank(self.group, src) if self.group else src
        self._run(
            what,
            lambda: self._dist.broadcast(buf, src=src_global, group=self.group, async_op=True),
        )
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def max(self, value: float, what: str) -> float:
        """The largest ``value`` over ranks."""
        buf = torch.tensor([value], dtype=torch.float64)
        buf = buf.to(self._device(buf))
        op = self._dist.ReduceOp.MAX
        self._run(what, lambda: self._dist.all_reduce(buf, op=op, group=self.group, async_op=True))
        return float(buf)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        """Give ``generator`` rank 0's state (in place; returned)."""
        state = generator.get_state()
        self.broadcast_(state, "sharing the random generator's state")
        generator.set_state(state)
        return generator

    def mark_in_sync(self, tensors: list[Tensor]) -> None:
        """Record that ``tensors`` are the same on every rank now (an optimizer that has
        just synchronised them says so), so that :meth:`check_same` can skip them until
        any of them is modified (tensors' version counters move on every in-place write)."""
        if not hasattr(self, "_in_sync"):
            self._in_sync: dict[int, int] = {}
        self._in_sync.update({id(t): t._version for t in tensors})

    def is_in_sync(self, tensors: list[Tensor]) -> bool:
        known = getattr(self, "_in_sync", {})
        return all(known.get(id(t)) == t._version for t in tensors)

    def attempt(
        self,
        local: Callable[[], T],
        what: str,
        *,
        params: Callable[[T], list[Tensor]] | None = None,
        flatten: Callable[[T], Tensor] | None = None,
        tag: int | tuple[int, int, int] | None = None,
    ) -> T:
        """Run this rank's ``local()`` and return its result, after a barrier that carries
        failures: a rank whose ``local()`` raised re-raises its error there, every other
        rank raises :class:`RankError` naming it (nobody waits for a rank that has gone).

        With ``params(out)`` (and ``flatten(out)``, their values as one vector; ``out`` is
        what ``local()`` returned), the same
        collective also says whether each rank knows them to be in sync
        (:meth:`mark_in_sync`); if any rank does not, every rank checks them
        (:meth:`check_same`). The decision is the same everywhere."""
        out, error = None, None
        ran = self._pending is None  # (a deferred error is raised in the collective below)
        if ran:
            try:
                out = local()
            except Exception as err:
                error = err
        unsynced = 0.0
        if ran and error is None and params is not None and not self.is_in_sync(params(out)):
            unsynced = 1.0
        total, _ = self.sum_weighted(torch.tensor([unsynced]), 0.0, error, what, tag)
        if float(total) > 0 and flatten is not None:
            self.check_same(flatten(out), "the model's parameters")
        return out  # type: ignore[return-value]

    def check_size(self, n: int, what: str) -> None:
        """Raise (on every rank alike) unless ``n`` is the same on every rank: before a
        broadcast of ``n`` values, whose size must agree (gloo aborts the process on a
        mismatch)."""
        ref = torch.tensor([n], dtype=torch.int64)
        self.broadcast_(ref, f"comparing the sizes of {what}")
        worst = self.max(float(abs(n - int(ref))), f"comparing the sizes of {what}")
        if worst > 0:
            raise ValueError(
                f"{what} differ in size between ranks (rank 0: {int(ref)}, this rank: {n}); "
                "every rank must hold the same model"
            )

    def check_same(self, x: Tensor, what: str) -> None:
        """Raise (on every rank alike) unless ``x`` is the same on every rank."""
        self.check_size(x.numel(), what)
        x = x.detach()
        ref = x.clone()
        self.broadcast_(ref, f"comparing {what} across ranks")
        diff = 0.0
        if x.numel():
            both_nan = torch.isnan(x) & torch.isnan(ref)
            gap = (x - ref).abs().masked_fill_(both_nan, 0.0)  # NaN where one side is NaN
            diff = float(gap.nan_to_num(nan=math.inf).max())
        worst = self.max(diff, f"comparing {what} across ranks")
        if worst > 0:
            raise ValueError(
                f"{what} differ between ranks (largest difference from rank 0: {worst:.3g}); "
                "every rank must start from the same values: seed every rank alike, or "
                "broadcast rank 0's with torch.distributed.broadcast"
            )


def as_communicator(group: Any, timeout: float | None) -> Communicator:
    """``group`` itself if it is a :class:`Communicator` (shared, with its counters), else a
    new one over the process group ``group``."""
    if isinstance(group, Communicator):
        return group
    return Communicator(group, timeout)
