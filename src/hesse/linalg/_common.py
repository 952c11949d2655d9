"""Shared pieces of the matrix-free algorithms: operands, the generator of random probes,
statuses (the vocabulary of :mod:`hesse._core._status`, re-exported), and the precision
they work in. The probes themselves are drawn by :func:`hesse._core._random.rademacher`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hesse._core._checks import check_choice as check_choice  # re-exported
from hesse._core._checks import check_int, check_real, check_seed
from hesse._core._status import NotConvergedError as NotConvergedError  # re-exported
from hesse._core._status import Status as Status  # re-exported
from hesse.operators import CurvatureOperator, DenseOperator

#: The names :mod:`hesse.linalg` gives in :meth:`Status.advice`'s templates: what computes
#: the products is the model (or the matrix) behind the operator.
ADVICE_NAMES = {"fun": "the model"}


def advice(status: Status, **names: str) -> str:
    """What to change after ``status`` (its one template, :meth:`Status.advice`), in
    :mod:`hesse.linalg`'s names, with a routine's own (``tol="rtol"``) over them.

    Example:
        >>> advice(Status.NON_FINITE)
        'check the model, the data and the dtype'
    """
    return status.advice(**{**ADVICE_NAMES, **names})


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


def as_operator(A: object, *, allow_empty: bool = False) -> CurvatureOperator:
    """A hesse operator for ``A``: a :class:`~hesse.operators.CurvatureOperator` as it is, a
    square floating point tensor as a :class:`~hesse.operators.DenseOperator`. An empty one
    (``P = 0``) is a ValueError unless ``allow_empty`` (for the routines whose answer is
    then simply empty, such as the exact diagonal)."""
    if isinstance(A, CurvatureOperator):
        op = A
    elif isinstance(A, Tensor):
        op = DenseOperator(A)
    else:
        raise TypeError(
            "A must be a hesse operator (HessianOperator, GGNOperator, ...) or a square "
            f"torch.Tensor, got {type(A).__name__}"
        )
    if op.shape[0] == 0 and not allow_empty:
        what = "matrix is empty (0 x 0)" if isinstance(A, Tensor) else "operator is empty (P=0)"
        raise ValueError(f"A: the {what}; there is nothing to compute")
    return op


# -- precision ---------------------------------------------------------------------------
#: Half types: products run in them, the algorithms' small dense algebra does not (CPU has
#: no eigh or QR for them, and their eps is too coarse to keep a basis orthogonal).
HALF_DTYPES = (torch.float16, torch.bfloat16)
#: A product in dtype ``d`` is taken to be accurate to ``PRODUCT_EPS * eps(d) * |A| |v|``
#: at best (the rounding of the operand alone costs one eps).
PRODUCT_EPS = 4.0


def algebra_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the dense algebra of an algorithm runs in when its products are in
    ``dtype``: float32 for float16 and bfloat16, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


class PromotedOperator(CurvatureOperator):
    """``op`` (float16 or bfloat16) seen in :func:`algebra_dtype`: each operand is cast to
    ``op.dtype`` for the product, which runs there, and the product is cast back."""

    def __init__(self, op: CurvatureOperator):
        super().__init__(op.shape[0], algebra_dtype(op.dtype), op.device)
        self.op, self.product_dtype = op, op.dtype
        self.symmetric, self.psd, self.chunk_size = op.symmetric, op.psd, op.chunk_size

    @property
    def product_rtol(self) -> float:  # type: ignore[override]  # the live value: it may grow
        return self.op.product_rtol

    def _matmat(self, V: Tensor) -> Tensor:
        return (self.op @ V.to(self.product_dtype)).to(self.dtype)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        return self.op.synchronize_generator(generator)


def promote(op: CurvatureOperator) -> CurvatureOperator:
    """``op`` itself when its dtype is the algebra's (no copy on the float32/float64 path),
    else a :class:`PromotedOperator` around it."""
    return op if algebra_dtype(op.dtype) == op.dtype else PromotedOperator(op)


def product_dtype(op: CurvatureOperator) -> torch.dtype:
    """The dtype ``op``'s products are computed in (through a :func:`promote`)."""
    return op.product_dtype if isinstance(op, PromotedOperator) else op.dtype


def error_floor(op: CurvatureOperator, scale: float) -> float:
    r"""The absolute error of a product with a unit vector that ``op`` cannot rule out,
    :math:`\max(\text{product\_rtol}, 4\,\epsilon_{\text{dtype}})\cdot\text{scale}` with
    ``scale`` an estimate of :math:`\|A\|`: a residual or an eigenvalue finer than it
    proves nothing. Read after the products (``product_rtol`` may grow as they are made)."""
    eps = torch.finfo(product_dtype(op)).eps
    return max(float(op.product_rtol), PRODUCT_EPS * eps) * float(scale)


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
    seed = check_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if seed is not None:
            raise ValueError("give seed or generator, not both")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"the generator is on {generator.device}, the operator on {device}")
        g = generator
    else:
        g = torch.Generator(device=device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        g.manual_seed(seed)
    return g if op is None else op.synchronize_generator(g)


def gaussian(
    n: int, k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """An ``(n, k)`` matrix of independent standard normal entries."""
    return torch.randn((n, k), generator=generator, dtype=dtype, device=device)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int (a NumPy integer too, never a bool or a float) ``>= minimum``."""
    return check_int(value, name, minimum)


def check_vector(v: object, n: int, name: str) -> Tensor:
    """Check an optional start vector (``v0``, ``x0``): a real tensor of shape ``(n,)``."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({n},), got {type(v).__name__}")
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(v.shape)}")
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got dtype {v.dtype}")
    return v


def check_tol(value: object, name: str = "tol") -> float:
    """A positive finite tolerance, as a float (None, strings and NaN refused)."""
    return check_real(value, name, 0.0, open_lo=True)
