"""Progress of long work: curvature products and passes over batches, as events.

The operators report what they do (``report("product", k)`` for ``k`` columns,
``report("batch")`` for each batch a pass computes, ``report("pass", total)`` when a pass
over data of known length begins), and the analyses what they will do at most
(``report("budget", m)``: ``m`` more product columns, such as Lanczos' step limit or a trace
estimator's ``num_matvecs``); nothing listens by default, and then a report costs one test
of an empty list. :func:`progress` prints a line on stderr; the ``hesse`` command
shows the same counts in its own progress bars.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

Listener = Callable[[str, int], None]
_listeners: list[Listener] = []


def report(event: str, n: int = 1) -> None:
    """Tell the listeners that ``event`` happened (``n`` times, or with total ``n``)."""
    for listener in _listeners:
        listener(event, n)


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call ``listener(event, n)`` for every report inside the context."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class Counts:
    """Products, batches and their rates since ``start``; the time left in the current
    pass over data of known length, and at most left in the analyses running (their
    product budgets, at the rate of the products so far)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.products = self.batches = 0
        self.budget = 0
        self.pass_total: int | None = None
        self.pass_done = 0
        self._pass_start = self.start

    def __call__(self, event: str, n: int) -> None:
        if event == "product":
            self.products += n
        elif event == "batch":
            self.batches += n
            self.pass_done += n
        elif event == "budget":
            # analyses run one after the other: a new budget replaces what an earlier
            # analysis left unspent (Lanczos converged before its step limit)
            self.budget = self.products + n
        elif event == "pass":
            self.pass_total, self.pass_done = (n or None), 0
            self._pass_start = time.perf_counter()

    def describe(self) -> str:
        now = time.perf_counter()
        rate = self.batches / max(now - self.start, 1e-9)
        text = f"{self.products} products, {self.batches} batches ({rate:.1f} batches/s)"
        if self.pass_total and 0 < self.pass_done < self.pass_total:
            per = (now - self._pass_start) / self.pass_done
            left = per * (self.pass_total - self.pass_done)
            text += f", pass {self.pass_done}/{self.pass_total}, ~{left:.0f} s left in it"
        if 0 < self.products < self.budget:
            per = (now - self.start) / self.products
            text += f", at most ~{per * (self.budget - self.products):.0f} s left"
        return text + f", {now - self.start:.0f} s"


@contextlib.contextmanager
def progress(stream: TextIO | None = None, every: float = 0.5) -> Iterator[Counts]:
    """Print the progress of hesse's work inside the context on ``stream`` (stderr), at most
    every ``every`` seconds: products done, batches per second, the time left in a pass
    over data of known length, and at most left in the analyses running (Lanczos' step
    limit, a trace estimator's budget; Lanczos often stops sooner). Off unless asked for.

    Example:
        >>> import io, torch, hesse
        >>> model = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(4, 3), torch.randn(4, 1))] * 3
        >>> H = hesse.HessianOperator(model, torch.nn.MSELoss(), data)
        >>> with progress(io.StringIO()) as counts:
        ...     _ = H @ torch.ones(4)
        >>> counts.products, counts.batches
        (1, 3)
    """
    out = stream if stream is not None else sys.stderr
    counts = Counts()
    last = [0.0]

    def listener(event: str, n: int) -> None:
        counts(event, n)
        now = time.perf_counter()
        if now - last[0] >= every:
            last[0] = now
            out.write("\rhesse: " + counts.describe() + " ")
            out.flush()

    with listen(listener):
        yield counts
    if counts.products or counts.batches:
        out.write("\rhesse: " + counts.describe() + "\n")
        out.flush()
