"""Flat parameter spaces: a list of tensors as one vector and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ParamSpace:
    """The flat vector space of a list of tensors.

    The flat vector is the concatenation of ``t.reshape(-1)`` for the tensors in order.

    Args:
        tensors: the tensors (parameters) that span the space; they must share one floating
            point dtype and one device.
        names: optional names, one per tensor.

    Example:
        >>> space = ParamSpace([torch.zeros(2, 3), torch.zeros(4)])
        >>> space.size
        10
        >>> [t.shape for t in space.unflatten(torch.arange(10.0))]
        [torch.Size([2, 3]), torch.Size([4])]
    """

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str] | None = None):
        tensors = list(tensors)
        if not tensors:
            raise ValueError("a parameter space needs at least one tensor, got none")
        if names is None:
            names = [str(i) for i in range(len(tensors))]
        if len(names) != len(tensors):
            raise ValueError(f"expected {len(tensors)} names, got {len(names)}")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        for n, t in zip(names, tensors):
            if not t.is_floating_point():
                raise TypeError(
                    f"parameter {n!r} must be floating point to be differentiated, "
                    f"got dtype {t.dtype}"
                )
        if len(dtypes) != 1:
            raise TypeError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}"
            )
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[torch.Size, ...] = tuple(t.shape for t in tensors)
        self.numels: tuple[int, ...] = tuple(t.numel() for t in tensors)
        self.size: int = sum(self.numels)
        self.dtype: torch.dtype = tensors[0].dtype
        self.device: torch.device = tensors[0].device

    def __repr__(self) -> str:
        return f"ParamSpace(size={self.size}, tensors={len(self.shapes)}, dtype={self.dtype})"

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate tensors shaped like the space into one vector of length ``size``."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: Tensor) -> tuple[Tensor, ...]:
        """Split a vector of length ``size`` into views shaped like the tensors."""
        return tuple(c.view(s) for c, s in zip(torch.split(vec, self.numels), self.shapes))

    def flatten_columns(self, tensors: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten_columns`: ``(k, *shape)`` tensors to ``(size, k)``."""
        k = tensors[0].shape[0]
        return torch.cat([t.reshape(k, -1) for t in tensors], dim=1).T

    def unflatten_columns(self, mat: Tensor) -> tuple[Tensor, ...]:
        """Split a matrix ``(size, k)`` into tensors of shape ``(k, *shape)`` (batch first)."""
        k = mat.shape[1]
        rows = mat.T
        return tuple(
            c.reshape(k, *s) for c, s in zip(torch.split(rows, self.numels, dim=1), self.shapes)
        )
