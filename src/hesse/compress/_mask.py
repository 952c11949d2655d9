"""What to prune: the sparsity of each layer, N:M patterns, and masks from scores.

A mask is a boolean tensor, ``True`` where a weight is kept (the convention of
:mod:`torch.nn.utils.prune`). ``pattern="N:M"`` keeps ``N`` weights of every ``M``
consecutive weights along the inputs of each output row (NVIDIA's 2:4 semi-structured
sparsity keeps 2 of 4): a sparsity of ``1 - N/M``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hesse._core._checks import check_real
from hesse.compress._layers import Layer

#: The default sparsity when neither ``sparsity`` nor ``pattern`` says one.
DEFAULT_SPARSITY = 0.5


def parse_pattern(pattern: object) -> tuple[int, int] | None:
    """``"N:M"`` as ``(N, M)`` with ``0 < N < M`` (``None`` stays ``None``)."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            "pattern must be a string 'N:M' with integers 0 < N < M (N weights kept in "
            f"every M consecutive ones, e.g. '2:4'), got {pattern!r}"
        )
    return int(match[1]), int(match[2])


def count(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a sparsity removes: ``sparsity * size``, rounded half up."""
    return math.floor(sparsity * size + 0.5)


def layer_sparsity(
    sparsity: object, layers: Sequence[Layer], nm: tuple[int, int] | None
) -> dict[str, float]:
    """The sparsity of each layer, checked: a float in ``[0, 1)`` for all of them, a dict
    ``{layer name: float}``, or ``None`` (``1 - N/M`` with a pattern, else 0.5)."""
    names = [layer.name for layer in layers]
    implied = None if nm is None else 1 - nm[0] / nm[1]
    if sparsity is None:
        return dict.fromkeys(names, DEFAULT_SPARSITY if implied is None else implied)
    if isinstance(sparsity, Mapping):
        values = {
            n: check_real(sparsity.get(n, 0.0), f"sparsity[{n!r}]", 0, 1, open_hi=True)
            for n in names
        }
    else:
        s = check_real(sparsity, "sparsity", 0, 1, open_hi=True)
        values = dict.fromkeys(names, s)
    if implied is not None:
        for n, s in values.items():
            if not math.isclose(s, implied, abs_tol=1e-9):
                raise ValueError(
                    f"pattern '{nm[0]}:{nm[1]}' keeps {nm[0]} of every {nm[1]} weights, a "
                    f"sparsity of {implied:g}, but the sparsity of layer {n!r} is {s:g}: give "
                    "one of them only"
                )
    return values


def check_pattern_fits(layer: Layer, nm: tuple[int, int] | None) -> None:
    """Refuse an N:M pattern whose groups do not tile the layer's rows."""
    if nm is not None and layer.shape[1] % nm[1]:
        raise ValueError(
            f"pattern '{nm[0]}:{nm[1]}' needs a number of inputs divisible by {nm[1]}, but "
            f"layer {layer.name!r} has {layer.shape[1]} inputs per output"
        )


def smallest(scores: Tensor, k: int) -> Tensor:
    """The mask that removes the ``k`` entries of ``scores`` with the smallest values."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    return mask.view(scores.shape)


def nm_mask(scores: Tensor, nm: tuple[int, int]) -> Tensor:
    """The mask that keeps, in every group of ``M`` consecutive columns of each row of
    ``scores``, the ``N`` entries with the largest values."""
    n, m = nm
    groups = scores.reshape(scores.shape[0], -1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.view(scores.shape)


def select(scores: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """The mask from a layer's ``(outputs, inputs)`` scores: N:M by groups, else the
    smallest ``round(sparsity * size)`` over the layer."""
    if nm is not None:
        return nm_mask(scores, nm)
    return smallest(scores, count(sparsity, scores.numel()))
