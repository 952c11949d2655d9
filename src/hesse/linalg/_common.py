"""Shared pieces of the matrix-free algorithms: operands, random probes, statuses."""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from hesse.operators import CurvatureOperator, DenseOperator


class Status(str, Enum):
    """How an iterative routine ended. A string, so ``result.status == "converged"`` works."""

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NEGATIVE_CURVATURE = "negative_curvature"
    BOUNDARY = "boundary"
    BREAKDOWN = "breakdown"
    NON_FINITE = "non_finite"
    BUDGET = "budget"  # a fixed budget of products was spent (estimators: not a failure)

    def __str__(self) -> str:
        return self.value


class NotConvergedError(RuntimeError):
    """Raised by ``result.raise_for_status()`` when a routine did not succeed."""


class Result:
    """What every result of :mod:`hesse.linalg` shares: ``success`` (its ``status`` is one
    of the class's ``OK`` statuses) and ``raise_for_status()`` (STYLE: the ``throw=True`` of
    lineax, on request). Subclasses are frozen dataclasses with ``status`` and ``message``."""

    OK: ClassVar[tuple[Status, ...]] = (Status.CONVERGED,)
    status: Status
    message: str

    @property
    def success(self) -> bool:
        return self.status in self.OK

    def raise_for_status(self):
        """Return ``self`` if it succeeded, else raise :class:`NotConvergedError` with the
        result's message (which says what to change)."""
        if not self.success:
            raise NotConvergedError(self.message)
        return self


def as_operator(A: object) -> CurvatureOperator:
    """A hesse operator for ``A``: a :class:`~hesse.operators.CurvatureOperator` as it is, a
    square floating point tensor as a :class:`~hesse.operators.DenseOperator`."""
    if isinstance(A, CurvatureOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise TypeError(
        "A must be a hesse operator (HessianOperator, GGNOperator, ...) or a square "
        f"torch.Tensor, got {type(A).__name__}"
    )


def maybe_linearize(A: CurvatureOperator, linearize: bool) -> CurvatureOperator:
    """``A.linearize()`` where the operator has it and the caller wants it: many products
    at one point then cost one backward pass each instead of a forward and two backwards."""
    return A.linearize() if linearize else A


def make_generator(
    seed: int | None,
    generator: torch.Generator | None,
    device: torch.device,
    op: CurvatureOperator | None = None,
) -> torch.Generator:
    """The generator that random probes are drawn from: ``generator`` if given (it must be
    on ``device``), else a new one seeded with ``seed`` (or from torch's global RNG).
    With ``op``, the operator may make the stream the same wherever its products are
    combined (:meth:`~hesse.operators.CurvatureOperator.synchronize_generator`: in
    data-parallel runs every rank then draws rank 0's probes)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("give seed or generator, not both")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"the generator is on {generator.device}, the operator on {device}")
        g = generator
    else:
        g = torch.Generator(device=device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        g.manual_seed(int(seed))
    return g if op is None else op.synchronize_generator(g)


def rademacher(
    n: int, k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """An ``(n, k)`` matrix of independent random signs, drawn as 0/1 directly in
    ``dtype`` and mapped in place (no integer tensor and conversion: 3x faster on CPU)."""
    z = torch.randint(0, 2, (n, k), generator=generator, dtype=dtype, device=device)
    return z.mul_(2).sub_(1)


def gaussian(
    n: int, k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """An ``(n, k)`` matrix of independent standard normal entries."""
    return torch.randn((n, k), generator=generator, dtype=dtype, device=device)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]
