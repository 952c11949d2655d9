"""How much memory cached graphs may take, and how much a graph takes.

A linearised operator keeps each batch's graph so that a product is one backward pass per
batch; over a large dataset those graphs would outgrow any device. The budget says how
many bytes of graphs may be held at once: batches beyond it are recomputed at each product,
and a partial cache leaves room for the graph that a recomputed batch builds.

The budget comes from, in order: the argument (``linearize(memory_budget=...)`` or the
operator's ``memory_budget``), the environment variable ``HESSE_MEMORY_BUDGET``, and a
default of half the memory the device has free when the graphs are built (CUDA:
``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``). An empty
variable counts as unset; ``0`` caches nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

ENV = "HESSE_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
#: Share of the free memory that the default budget takes.
DEFAULT_SHARE = 0.5


def parse_budget(value: object, what: str = "memory_budget") -> int:
    """Bytes from an int, a float, or a string such as ``"256M"``, ``"1.5G"``, ``"0"``."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of bytes or a string like '256M', got a bool")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
        if m is None:
            raise ValueError(
                f"{what} must be a number of bytes with an optional K, M, G or T suffix "
                f"(e.g. '256M'), got {value!r}"
            )
        number = float(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise TypeError(
            f"{what} must be a number of bytes or a string like '256M', got {type(value).__name__}"
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number of bytes >= 0, got {value!r}")
    return int(number)


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now (CUDA), or the host's available memory (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**32  # unknown: 4 GiB


def resolve_budget(value: object, device: torch.device) -> int:
    """The budget in bytes: ``value`` if given, else ``HESSE_MEMORY_BUDGET``, else the
    default share of the device's free memory."""
    if value is not None:
        return parse_budget(value)
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return parse_budget(env, ENV)
    return int(DEFAULT_SHARE * free_memory(device))


class GraphMeter:
    """Counts the bytes of the tensors that autograd saves while graphs are recorded in
    :meth:`measure`, each storage once and without the ``exclude`` storages (the parameters,
    which exist anyway). Device-agnostic: it sees what a graph keeps alive, on CPU and CUDA
    alike, through :func:`torch.autograd.graph.saved_tensors_hooks`."""

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._seen = {_storage(t) for t in exclude}
        self.bytes = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[GraphMeter]:
        """Count the graphs recorded inside; ``self.bytes`` is the count of this call."""
        self.bytes = 0

        def pack(t: Tensor) -> Tensor:
            key = _storage(t)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self


def _storage(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())
