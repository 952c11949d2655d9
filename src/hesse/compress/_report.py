"""What :func:`hesse.prune` returns: per layer the mask, the sparsity reached, the
predicted and the measured increase of what the method minimises; and the masks'
re-application for fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerPrune:
    """One pruned layer.

    Attributes:
        name: the module's name in the model.
        kind: its class (``"Linear"``, ``"Conv2d"``, ``"Conv1D"``).
        shape: ``(outputs, inputs)`` of its weight matrix (a convolution's inputs are
            ``in_channels * kh * kw``).
        mask: ``True`` where a weight is kept, in the layout of the module's ``weight``.
        sparsity: the share of the weights removed.
        predicted: the increase the method's quadratic model predicts (the sum of the
            costs of its removals): of the layer's reconstruction error for the layer-wise
            methods, of the loss for ``"obd"`` and ``"obs"``; ``None`` for
            ``"magnitude"``, which has no model.
        measured: the same increase measured: the reconstruction error
            :math:`\\|(W - \\hat W) X\\|_F^2 / N` over the ``N`` input columns the layer saw
            (layer-wise methods), or the loss over the data with only this layer pruned
            minus the dense loss (``"obd"``, ``"obs"``).
        seconds: the time the method spent on the layer (without the passes over data).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    mask: Tensor
    sparsity: float
    predicted: float | None
    measured: float
    seconds: float


@dataclass(frozen=True)
class PruneReport:
    """The result of :func:`hesse.prune`.

    Attributes:
        method: the method's name.
        pattern: the N:M pattern (``"2:4"``) or ``None``.
        objective: what ``predicted`` and ``measured`` of each layer are about:
            ``"reconstruction"`` (the layer's output on the data) or ``"loss"``.
        layers: ``{name: LayerPrune}`` in the order the layers were pruned.
        loss_before, loss_after: the loss over the data before and after pruning.
        seconds: the wall-clock time of the whole call.
    """

    method: str
    pattern: str | None
    objective: str
    layers: dict[str, LayerPrune]
    loss_before: float
    loss_after: float
    seconds: float

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{layer name: mask}``, ``True`` where a weight is kept."""
        return {name: layer.mask for name, layer in self.layers.items()}

    @property
    def sparsity(self) -> float:
        """The share of the weights of the pruned layers that were removed."""
        total = sum(layer.mask.numel() for layer in self.layers.values())
        kept = sum(int(layer.mask.sum()) for layer in self.layers.values())
        return 1 - kept / total if total else 0.0

    @property
    def predicted(self) -> float | None:
        """The sum of the layers' predicted increases (``None`` for ``"magnitude"``)."""
        values = [layer.predicted for layer in self.layers.values()]
        return None if any(v is None for v in values) else float(sum(values))

    def reapply(self, model: nn.Module) -> None:
        """Zero the pruned weights of ``model`` again (after an optimizer step, say).
        ``model`` is the pruned model or one with the same module names."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, mask in self.masks.items():
                module = modules[name]
                weight = getattr(module, "weight_orig", None)
                weight = module.weight if weight is None else weight
                weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))

    def register(self, model: nn.Module) -> None:
        """Keep the sparsity through training: each pruned layer's ``weight`` becomes
        ``weight_orig * weight_mask`` with :func:`torch.nn.utils.prune.custom_from_mask`
        (gradients of removed weights are zero too; an optimizer made before keeps
        working, ``weight_orig`` is the same parameter). Undo it, keeping the zeros, with
        ``torch.nn.utils.prune.remove(module, "weight")``."""
        from torch.nn.utils import prune as torch_prune

        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            weight = modules[name].weight
            torch_prune.custom_from_mask(modules[name], "weight", mask.to(weight.device))

    def as_dicts(self) -> list[dict[str, Any]]:
        """One row per layer (without the masks), for tables and JSON."""
        return [
            {
                "name": layer.name,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "sparsity": layer.sparsity,
                "predicted": layer.predicted,
                "measured": layer.measured,
                "seconds": layer.seconds,
            }
            for layer in self.layers.values()
        ]

    def __repr__(self) -> str:
        return (
            f"PruneReport(method={self.method!r}, pattern={self.pattern!r}, layers="
            f"{len(self.layers)}, sparsity={self.sparsity:.4g}, loss {self.loss_before:.6g} "
            f"-> {self.loss_after:.6g})"
        )
