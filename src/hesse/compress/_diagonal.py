r"""The exact diagonal of the GGN over the weights of linear and convolutional layers, from
one backward pass per column of the output Hessian's square root and position of the
output, for Optimal Brain Damage.

For a layer :math:`s = W x` (``nn.Linear``; ``nn.Conv2d`` on the patches :math:`x_r` of its
input, its output positions :math:`r`), the GGN of a batch's loss is :math:`G = \sum_n J_n^\top
H_n J_n` with :math:`H_n = \sum_k S_{nk} S_{nk}^\top` the output Hessian of sample :math:`n`.
Backpropagating a column :math:`S_k` through the model gives, at the layer's output,
:math:`g_{nkr}` and the per-sample gradient :math:`\sum_r g_{nkr} x_{nr}^\top` of
:math:`\langle S_{nk}, f_n\rangle`, so

.. math:: \operatorname{diag}(G)_W = \sum_n \sum_k \Big(\sum_r g_{nkr} x_{nr}^\top\Big)^{\odot 2}.

A column of :func:`hesse.operators._kfac._hessian_sqrt` holds the same column of every
position's square root at once; the output Hessian is block diagonal over positions, not
over the samples' whole outputs, so a sample with several output positions (a sequence, an
image) needs each column once per position, on its own: ``K`` backward passes per batch
for one position, ``K P`` for ``P`` positions, against one GGN product (a forward and two
backward passes over the data) per weight for ``hesse.diagonal(GGNOperator(...),
"exact")``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hesse.compress._layers import Layer
from hesse.func import ModelIO, ModelLoss
from hesse.func._output import OutputCurvature
from hesse.operators._kfac import _hessian_sqrt, _input_rows, _output_rows, _record
from hesse.operators._model import _check_data


def covered(layers: Sequence[Layer], loss_fn: Any) -> bool:
    """Whether :func:`ggn_diagonal` applies: ``nn.Linear`` and ``nn.Conv2d`` layers, and a
    loss whose output Hessian has a known square root (``MSELoss``, ``CrossEntropyLoss``,
    ``BCEWithLogitsLoss``)."""
    if not all(isinstance(layer.module, (nn.Linear, nn.Conv2d)) for layer in layers):
        return False
    try:
        return OutputCurvature(loss_fn).kind != "generic"
    except ValueError:  # a loss that does not reduce to a scalar: prune says so itself
        return False


def ggn_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    layers: Sequence[Layer],
    io: ModelIO | None = None,
) -> Tensor:
    """The diagonal of the GGN of the loss over ``data`` with respect to the weights of
    ``layers`` (in their order, each flattened in its own layout), weighted over batches as
    :class:`hesse.GGNOperator` weights them. Needs :func:`covered`."""
    fn = ModelLoss(model, loss_fn, [layer.weight for layer in layers], io, second_order=False)
    curv = OutputCurvature(loss_fn)
    mean = curv.reduction == "mean"
    data = _check_data(data, io=fn.io)
    params = fn.params()
    sums = [
        torch.zeros(layer.shape, dtype=fn.space.dtype, device=fn.space.device) for layer in layers
    ]
    total = 0.0
    for batch in data:
        weight = fn.weight(batch)
        if weight == 0:
            continue
        inputs, targets = fn.split(batch)
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        handles = [
            layer.module.register_forward_hook(partial(_record, seen=seen, name=layer.name))
            for layer in layers
        ]
        try:
            with torch.enable_grad():
                out = fn.outputs(params, inputs)
        finally:
            for h in handles:
                h.remove()
        missing = [layer.name for layer in layers if layer.name not in seen]
        if missing:
            raise ValueError(
                f"layer(s) {missing} did not run in the forward pass over the data: leave "
                "them out of params"
            )
        curv.check_targets(out, targets)
        probes = [seen[layer.name][1] for layer in layers]
        xs = [_input_rows(layer.module, seen[layer.name][0]) for layer in layers]
        scale = weight if mean else 1.0
        for column in _positions(_hessian_sqrt(curv, out, targets), curv.class_dim):
            grads = torch.autograd.grad(out, probes, column, retain_graph=True, allow_unused=True)
            for j, (layer, g) in enumerate(zip(layers, grads)):
                if g is None:
                    continue
                g = _output_rows(layer.module, g.unsqueeze(0))[0]  # (N, R, out)
                per_sample = torch.einsum("nro,nrd->nod", g, xs[j])
                sums[j].add_((per_sample * per_sample).sum(0), alpha=scale)
        total += weight
    if total == 0:
        raise ValueError("data is empty: expected at least one batch (inputs, targets)")
    return torch.cat([(s / total if mean else s).reshape(-1) for s in sums])


def _positions(S: Tensor, class_dim: int) -> Iterator[Tensor]:
    """The columns ``S`` of shape ``(K, N, ...)``, each split by the output positions of a
    sample (every dimension but the samples' and the classes'): one column per ``k`` and
    position, zero at the other positions."""
    if S.dim() <= 3:  # (K, N) or (K, N, C): one position per sample
        yield from S
        return
    cls = class_dim + 1 if class_dim >= 0 else S.dim() + class_dim
    moved = S.movedim(cls, -1)  # (K, N, *positions, C)
    shape = moved.shape[1:]
    flat = moved.reshape(S.shape[0], S.shape[1], -1, shape[-1])  # (K, N, P, C)
    for k in range(flat.shape[0]):
        for p in range(flat.shape[2]):
            column = torch.zeros_like(flat[k])
            column[:, p] = flat[k, :, p]
            yield column.reshape(shape).movedim(-1, cls - 1)
