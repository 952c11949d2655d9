"""The layers hesse prunes, seen as one matrix each, and the second moments of their
inputs.

Every supported layer computes ``W x`` for a weight matrix ``W`` of shape
``(outputs, inputs)`` and an input column ``x``:

* ``nn.Linear``: ``W`` is ``weight``, ``x`` a row of the input (leading dimensions are
  samples);
* ``nn.Conv2d`` (``groups=1``): ``W`` is ``weight`` flattened to
  ``(out_channels, in_channels * kh * kw)`` and ``x`` a patch of the (padded) input, as
  :func:`torch.nn.functional.unfold` lays it out (OBC and SparseGPT do the same);
* ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): ``W`` is ``weight.T``
  (the module stores ``(inputs, outputs)``).

The layer Hessian of the reconstruction error is :math:`H = \\frac{2}{N} X X^\\top` over
the ``N`` input columns the layer saw: :class:`InputMoments` accumulates it with forward
hooks, in the weight's dtype (float32 for half precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv1d_type() -> type | None:
    """Hugging Face's ``Conv1D``, if transformers is installed (it is optional)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return Conv1D


SUPPORTED = "nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D"


@dataclass
class Layer:
    """One prunable layer: its name in the model, the module, and its matrix view."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def transposed(self) -> bool:
        """Whether the module stores ``W.T`` (transformers' ``Conv1D``)."""
        return not isinstance(self.module, (nn.Linear, nn.Conv2d))

    def matrix(self, t: Tensor) -> Tensor:
        """A tensor of the weight's shape as the ``(outputs, inputs)`` matrix (a view)."""
        if self.transposed:
            return t.T
        return t.reshape(t.shape[0], -1)

    def from_matrix(self, m: Tensor) -> Tensor:
        """The inverse of :meth:`matrix`: a tensor of the weight's shape."""
        if self.transposed:
            return m.T
        return m.reshape(self.weight.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """``(outputs, inputs)`` of the matrix view."""
        rows, cols = self.matrix(self.weight).shape
        return int(rows), int(cols)

    def columns(self, x: Tensor) -> Tensor:
        """The layer's input as a ``(N, inputs)`` matrix of columns ``x`` (one per row)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:  # an unbatched image
                x = x.unsqueeze(0)
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])


def _check_module(name: str, module: nn.Module) -> Layer:
    conv1d = _conv1d_type()
    ok = isinstance(module, (nn.Linear, nn.Conv2d)) or (
        conv1d is not None and isinstance(module, conv1d)
    )
    if not ok:
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}; hesse.prune prunes {SUPPORTED}: "
            "leave it out of params"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"layer {name!r} is a grouped convolution (groups={module.groups}); hesse.prune "
            "prunes convolutions with groups=1: leave it out of params"
        )
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        raise TypeError(
            f"layer {name!r} has no weight parameter (is it pruned with torch.nn.utils.prune "
            "already? call torch.nn.utils.prune.remove(module, 'weight') first)"
        )
    return Layer(name, module)


def _supported(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def select_layers(model: nn.Module, params: Sequence[object] | None) -> list[Layer]:
    """The layers to prune.

    Args:
        model: the network.
        params: module names, modules, or their weight parameters (or the weight's name,
            ``"fc.weight"``); ``None``: every supported layer whose weight is its own (not
            tied to another module's, as GPT-2's ``lm_head`` is to the embedding) and
            that the model calls itself (not ``nn.MultiheadAttention.out_proj``, whose
            weight the attention reads directly).
    """
    modules = dict(model.named_modules())
    if params is None:
        owners: dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        inside_mha = {
            f"{n}.{c}" if n else c
            for n, m in modules.items()
            if isinstance(m, nn.MultiheadAttention)
            for c, _ in m.named_children()
        }
        layers = [
            Layer(n, m)
            for n, m in modules.items()
            if _supported(m)
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and owners.get(id(m.weight), 0) == 1
            and n not in inside_mha
        ]
        if not layers:
            raise ValueError(
                f"the model has no layer hesse.prune can prune ({SUPPORTED}, weights not tied)"
            )
        return layers
    if isinstance(params, (str, nn.Module, Tensor)):
        params = [params]
    by_weight = {
        id(m.weight): n
        for n, m in modules.items()
        if isinstance(getattr(m, "weight", None), Tensor)
    }
    by_module = {id(m): n for n, m in modules.items()}
    names: list[str] = []
    for p in params:
        if isinstance(p, str):
            name = p[: -len(".weight")] if p not in modules and p.endswith(".weight") else p
            if name not in modules:
                raise ValueError(
                    f"the model has no module named {p!r}; prunable ones: "
                    f"{[n for n, m in modules.items() if _supported(m)]}"
                )
        elif isinstance(p, nn.Module) and id(p) in by_module:
            name = by_module[id(p)]
        elif isinstance(p, Tensor) and id(p) in by_weight:
            name = by_weight[id(p)]
        else:
            raise TypeError(
                "params must hold layers of the model (module names, modules or their "
                f"weights), got {type(p).__name__}"
                + ("" if isinstance(p, str) else " that is not part of the model")
            )
        names.append(name)
    if not names:
        raise ValueError("params is empty: select at least one layer to prune")
    if len(set(names)) != len(names):
        raise ValueError(f"params names a layer twice: {names}")
    return [_check_module(n, modules[n]) for n in names]


class InputMoments:
    """Forward hooks that accumulate :math:`\\sum x x^\\top` and the count of input
    columns of some layers; :meth:`hessian` gives :math:`H = \\frac{2}{N} X X^\\top`.

    Use as a context manager around the forward passes; the hooks are removed on exit.
    """

    def __init__(self, layers: Iterable[Layer]):
        self.layers = list(layers)
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {layer.name: 0 for layer in self.layers}
        self.order: list[str] = []  # the order in which the layers were first called
        self._handles: list = []

    def __enter__(self) -> InputMoments:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: Layer):
        dtype = layer.weight.dtype
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

        def hook(module: nn.Module, args: tuple) -> None:
            x = layer.columns(args[0].detach()).to(acc)
            if layer.name not in self.sums:
                self.sums[layer.name] = torch.zeros(
                    x.shape[1], x.shape[1], dtype=acc, device=x.device
                )
                self.order.append(layer.name)
            self.sums[layer.name].addmm_(x.T, x)
            self.counts[layer.name] += x.shape[0]

        return hook

    def hessian(self, name: str) -> Tensor:
        """:math:`H = \\frac{2}{N} X X^\\top` of layer ``name``, or a clear error if the
        forward passes never called it."""
        if not self.counts.get(name):
            raise ValueError(
                f"layer {name!r} was never called as a module in the forward pass over the "
                "data, so its inputs are unknown (nn.MultiheadAttention reads out_proj's "
                "weight directly, for one): leave it out of params"
            )
        return self.sums[name] * (2.0 / self.counts[name])


def default_layers(model: nn.Module) -> list[str]:
    """The names of the layers :func:`hesse.prune` prunes when ``params`` is ``None``:
    every ``nn.Linear``, ``nn.Conv2d`` (``groups=1``) and transformers' ``Conv1D`` whose
    weight is its own and that the model calls as a module."""
    return [layer.name for layer in select_layers(model, None)]
