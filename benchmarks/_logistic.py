"""L2-regularised logistic regression as ``logistic.py`` and ``minimize_logistic.py`` pose
it: the objective, a run checked on it, and the ratios to the fastest peer.

* :class:`Logistic`: ``f(x) = mean BCE(X w (+ b), y) + l2/2 |w|^2`` of one flat float64
  ``x`` (``[w; b]`` with an intercept), with ``f(0)`` and ``||grad f(0)||_2``;
* :func:`checked_run`: one solver run, timed end to end (``_solvers.guarded_run``), then
  checked outside the time by the 2-norm of the gradient of the benchmark's own ``f`` at the
  point returned, against ``TARGET * ||grad f(0)||_2``;
* :func:`rank_by_best_peer`: the fastest peer that reached the target, and every row's
  time as a ratio to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from _solvers import guarded_run

TARGET = 1e-6  # ||grad f(x)||_2 <= TARGET ||grad f(0)||_2


@dataclass
class Logistic:
    """``f(x) = mean BCE(X w + b, y) + l2/2 |w|^2`` with ``x = [w; b]`` (``intercept``), or
    of ``x = w`` without; ``f0`` and ``g0`` (the gradient's 2-norm) at ``x = 0``."""

    name: str
    X: Tensor
    y: Tensor
    l2: float
    intercept: bool
    problem: Any = None  # the hesse.problems.Problem it came from, if any
    f0: float = field(init=False, default=math.nan)
    g0: float = field(init=False, default=math.nan)

    def __post_init__(self) -> None:
        self.f0, g = self.value_grad(self.zeros())
        self.g0 = float(g.norm())

    @property
    def P(self) -> int:
        """The number of unknowns."""
        return self.X.shape[1] + int(self.intercept)

    @property
    def Xn(self) -> np.ndarray:
        return self.X.numpy()

    @property
    def yn(self) -> np.ndarray:
        return self.y.numpy()

    @property
    def target(self) -> float:
        return TARGET * self.g0

    def fun(self, x: Tensor) -> Tensor:
        w = x[:-1] if self.intercept else x
        z = self.X @ w + x[-1] if self.intercept else self.X @ w
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, self.y)
        return bce + 0.5 * self.l2 * torch.dot(w, w)

    def value_grad(self, x: Tensor) -> tuple[float, Tensor]:
        with torch.enable_grad():
            x = x.detach().to(torch.float64).clone().requires_grad_()
            f = self.fun(x)
            (g,) = torch.autograd.grad(f, x)
        return float(f.detach()), g

    def zeros(self) -> Tensor:
        return torch.zeros(self.P, dtype=torch.float64)


def checked_run(
    call: Callable[[], tuple[Tensor, dict]], lg: Logistic, limit: float, slack: float = 0.0
) -> dict:
    """One run, timed end to end and stopped after ``limit`` seconds, then checked (outside
    the time) on the benchmark's own ``f``: ``ok`` where the relative gradient norm is at
    most ``TARGET * (1 + slack)``."""
    x, rec = guarded_run(call, limit)
    if x is None:
        return rec
    f, g = lg.value_grad(x)
    rel = float(g.norm()) / lg.g0
    return {"ok": rel <= TARGET * (1 + slack), "rel_grad": rel, "f": f, **rec}


def rank_by_best_peer(rows: dict[str, dict]) -> str | None:
    """The fastest row that is not hesse's and has a time (None if there is none); adds
    ``ratio_to_best_peer`` (None where there is no time) to every row, in place."""
    peers = [k for k, r in rows.items() if r["library"] != "hesse" and r["seconds"] is not None]
    best_peer = min(peers, key=lambda k: rows[k]["seconds"]) if peers else None
    for r in rows.values():
        r["ratio_to_best_peer"] = (
            r["seconds"] / rows[best_peer]["seconds"]
            if best_peer and r["seconds"] is not None
            else None
        )
    return best_peer
