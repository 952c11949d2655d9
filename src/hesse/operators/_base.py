"""Lazy linear operators of shape ``(P, P)`` and their algebra."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hesse._core import all_finite, check_finite, check_operand
from hesse._core._progress import report


class CurvatureOperator:
    """A lazy square linear operator on flat vectors of length ``P``.

    Subclasses set ``shape``, ``dtype``, ``device`` and the structure tags ``symmetric`` and
    ``psd``, and implement ``_matmat(V)`` for ``V`` of shape ``(P, k)``. The base class
    checks operands (shape, dtype, device, finiteness), splits wide operands into column
    chunks of at most ``chunk_size``, checks that results are finite, and provides ``@``,
    ``+``, ``-``, scalar ``*``, :meth:`damped`, :meth:`to_dense` and :meth:`to_scipy`.
    """

    symmetric: bool = True
    psd: bool = False
    #: Most columns applied at once (memory grows with the columns of one chunk).
    chunk_size: int = 32
    #: Relative accuracy of a product, ``|computed - exact| <= product_rtol * |A| |v|`` as
    #: far as the operator knows: 0 for exact (autograd) products; a finite-difference
    #: operator raises it as it measures its own error. Algorithms do not certify results
    #: finer than this.
    product_rtol: float = 0.0

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str):
        self.shape: tuple[int, int] = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)

    # -- products ---------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        if isinstance(v, CurvatureOperator):
            return NotImplemented
        V, single = check_operand(v, self.shape[1], self.dtype, self.device, check_values=False)
        if V.shape[1] == 0:  # no columns, no products: an empty result, as torch.matmul gives
            return V.new_zeros((self.shape[0], 0))
        report("product", V.shape[1])
        if V.shape[1] <= self.chunk_size:
            out = self._matmat(V)
        else:
            out = torch.cat(
                [self._matmat(c) for c in torch.split(V, self.chunk_size, dim=1)], dim=1
            )
        # Operand, result and the values the product was computed from (the losses of a
        # model's batches) are checked together, after the product: one host sync (a GPU
        # stall) per product; a non-finite operand only costs a wasted product.
        losses = self._losses_seen()
        if not all_finite(V, out, *losses):
            check_finite(V, "the vector")
            for loss in losses:
                check_finite(loss, NONFINITE_LOSS)
            check_finite(out, NONFINITE_PRODUCT)
        return out[:, 0] if single else out

    def _losses_seen(self) -> list[Tensor]:
        """The loss values behind the latest product (a model's batches), to be checked
        finite with it: a curvature can be finite where the loss is not (NaN targets of a
        squared error leave its Hessian alone), and then it means nothing."""
        return []

    def matvec(self, v: Tensor) -> Tensor:
        """``self @ v`` for a vector ``v`` of shape ``(P,)``."""
        return self @ v

    # -- algebra ----------------------------------------------------------------------
    def __add__(self, other: object) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([self, other])

    def __sub__(self, other: object) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([self, ScaledOperator(other, -1.0)])

    def __neg__(self) -> CurvatureOperator:
        return ScaledOperator(self, -1.0)

    def __mul__(self, c: object) -> CurvatureOperator:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = float(c)
        if not isinstance(c, numbers.Real) or isinstance(c, bool):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def damped(self, damping: float) -> CurvatureOperator:
        r"""The operator :math:`A + \lambda I` (Levenberg-Marquardt / Tikhonov damping)."""
        damping = float(damping)
        if not np.isfinite(damping):
            raise ValueError(f"damping must be finite, got {damping}")
        return SumOperator(
            [self, damping * IdentityOperator(self.shape[0], self.dtype, self.device)]
        )

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        """The generator random probes for this operator are drawn from, made the same
        wherever the operator's products are combined. A local operator returns it as is;
        a data-parallel one (:mod:`hesse.distributed`) gives every rank rank 0's state, so
        that Hutchinson probes, Lanczos starts and SLQ vectors agree across ranks."""
        return generator

    def linearize(self) -> CurvatureOperator:
        """An equivalent operator that does the per-point work once, for many products at
        one point (see :meth:`hesse.operators.ModelCurvature.linearize`); ``self`` where
        there is nothing to do once."""
        return self

    @property
    def T(self) -> CurvatureOperator:
        if not self.symmetric:
            raise NotImplementedError(f"{type(self).__name__} is not symmetric; no transpose")
        return self

    # -- conversions ------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The dense ``(P, P)`` matrix, built ``chunk_size`` columns at a time. For small P."""
        n = self.shape[1]
        cols = []
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self @ E)
        return torch.cat(cols, dim=1)

    def to_scipy(self):  # -> scipy.sparse.linalg.LinearOperator
        """A :class:`scipy.sparse.linalg.LinearOperator` on numpy arrays (copies to and from
        the operator's device and dtype at each product)."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np_dtype), device=self.device)
            V = V.reshape(self.shape[1], -1)
            return (self @ V).cpu().numpy()

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(x).reshape(-1)

        return LinearOperator(
            self.shape,
            matvec=matvec,
            matmat=matmat,
            rmatvec=matvec if self.symmetric else None,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        tags = [t for t in ("symmetric", "psd") if getattr(self, t)]
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, tags={tags})"
        )


def _common(ops: Sequence[CurvatureOperator]) -> tuple[int, torch.dtype, torch.device]:
    first = ops[0]
    for op in ops[1:]:
        if op.shape != first.shape:
            raise ValueError(f"operators must share one shape, got {first.shape} and {op.shape}")
        if op.dtype != first.dtype or op.device != first.device:
            raise TypeError(
                f"operators must share dtype and device, got {first.dtype} on {first.device} "
                f"and {op.dtype} on {op.device}"
            )
    return first.shape[0], first.dtype, first.device


#: What a non-finite loss behind a product is called in the error.
NONFINITE_LOSS = (
    "the loss at the current parameters (a curvature of a non-finite loss means nothing: "
    "look for NaN or infinity in the parameters, the inputs or the targets)"
)
NONFINITE_PRODUCT = (
    "the curvature product (the vector and the loss are finite, so a second derivative is "
    "not: look for NaN or infinity in the inputs or parameters that the loss saturates "
    "away, a function such as sqrt, abs or log evaluated where its derivative is infinite, "
    "or an overflow of the dtype)"
)


class SumOperator(CurvatureOperator):
    """The sum of operators of one shape, dtype and device."""

    def __init__(self, ops: Sequence[CurvatureOperator]):
        flat: list[CurvatureOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, SumOperator) else [op])
        super().__init__(*_common(flat))
        self.ops = flat
        self.symmetric = all(op.symmetric for op in flat)
        self.psd = all(op.psd for op in flat)
        self.chunk_size = min(op.chunk_size for op in flat)

    def linearize(self) -> CurvatureOperator:
        return SumOperator([op.linearize() for op in self.ops])

    @property
    def product_rtol(self) -> float:
        return max(op.product_rtol for op in self.ops)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        for op in self.ops:
            generator = op.synchronize_generator(generator)
        return generator

    def _losses_seen(self) -> list[Tensor]:
        return [loss for op in self.ops for loss in op._losses_seen()]

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0]._matmat(V)
        for op in self.ops[1:]:
            out = out + op._matmat(V)
        return out


class ScaledOperator(CurvatureOperator):
    """``c * A`` for a real scalar ``c``."""

    def __init__(self, op: CurvatureOperator, c: float):
        if not np.isfinite(c):
            raise ValueError(f"the scale must be finite, got {c}")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.c = op, float(c)
        self.symmetric = op.symmetric
        self.psd = op.psd and self.c >= 0
        self.chunk_size = op.chunk_size

    def linearize(self) -> CurvatureOperator:
        return ScaledOperator(self.op.linearize(), self.c)

    @property
    def product_rtol(self) -> float:
        return self.op.product_rtol

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        return self.op.synchronize_generator(generator)

    def _losses_seen(self) -> list[Tensor]:
        return self.op._losses_seen()

    def _matmat(self, V: Tensor) -> Tensor:
        return self.c * self.op._matmat(V)


class IdentityOperator(CurvatureOperator):
    """The identity of size ``P``."""

    psd = True

    def __init__(
        self, size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        super().__init__(size, dtype, device)
        self.chunk_size = max(int(size), 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return V


class DenseOperator(CurvatureOperator):
    """A dense square matrix as an operator (tests, small problems, references).

    Args:
        A: a square floating point matrix.
        symmetric, psd: structure tags; ``symmetric`` is checked, ``psd`` is trusted.
    """

    def __init__(self, A: Tensor, *, symmetric: bool | None = None, psd: bool = False):
        if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
            got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
            raise ValueError(f"A must be a square matrix tensor, got {got}")
        if not A.is_floating_point():
            raise TypeError(f"A must be floating point, got {A.dtype}")
        check_finite(A, "A")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A
        is_sym = bool(torch.allclose(A, A.T))
        if symmetric and not is_sym:
            raise ValueError("symmetric=True, but A is not symmetric")
        self.symmetric = is_sym if symmetric is None else bool(symmetric)
        self.psd = bool(psd)
        self.chunk_size = max(A.shape[0], 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V
