"""``hesse.prune``: the front end that picks the layers, gathers the curvature, runs a
method of :mod:`hesse.compress._obs` and writes the pruned weights into the model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesse._core._checks import check_finite, check_real, check_seed
from hesse.analysis import diagonal as diagonal_of
from hesse.analysis._spectrum import DIAGONAL_METHODS
from hesse.compress._diagonal import covered, ggn_diagonal
from hesse.compress._layers import InputMoments, Layer, select_layers
from hesse.compress._mask import check_pattern_fits, count, layer_sparsity, parse_pattern, select
from hesse.compress._obs import damped, exact_obs, greedy_obs, inverse, sparsegpt
from hesse.compress._report import LayerPrune, PruneReport
from hesse.func import ModelIO, ModelLoss
from hesse.linalg._common import check_choice
from hesse.operators import FisherOperator, GGNOperator, HessianOperator
from hesse.operators._model import _check_data

#: The methods, layer-wise (a layer's reconstruction error) then global (the loss).
LAYERWISE = ("magnitude", "layer-obs", "sparsegpt")
GLOBAL = ("obd", "obs")
METHODS = (*LAYERWISE, *GLOBAL)
#: How ``"layer-obs"`` spreads a layer's removals over its rows.
ALLOCATIONS = ("layer", "row")
#: The curvatures of the loss ``"obd"`` and ``"obs"`` use.
CURVATURES = {"ggn": GGNOperator, "fisher": FisherOperator, "hessian": HessianOperator}
#: The most weights global OBS prunes together: it holds the dense inverse of their
#: curvature (``P^2`` entries; 5,000 weights take 100 MB in float32) and updates it once
#: per removed weight (``O(P^3)`` in all).
OBS_MAX_PARAMS = 5000


def prune(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Any,
    *,
    sparsity: float | Mapping[str, float] | None = None,
    method: str = "layer-obs",
    pattern: str | None = None,
    params: Sequence[object] | None = None,
    io: ModelIO | None = None,
    damping: float = 0.01,
    sequential: bool = True,
    blocksize: int = 128,
    allocation: str = "layer",
    curvature: str = "ggn",
    diagonal: str | Tensor = "exact",
    num_matvecs: int = 100,
    seed: int | None = None,
) -> PruneReport:
    r"""Prune ``model`` in place: set a share of the weights of its linear and
    convolutional layers to zero and, for the OBS methods, move the remaining weights
    to make up for them.

    Methods:

    * ``"magnitude"``: remove the weights of least :math:`|w|` in each layer (the
      baseline).
    * ``"layer-obs"``: ExactOBS / OBC (Frantar, Singh & Alistarh, "Optimal Brain
      Compression", NeurIPS 2022). Each layer minimises its reconstruction error
      :math:`\|W X - \hat W X\|_F^2 / N` on the inputs :math:`X` (``N`` columns) it sees
      over ``data``, whose Hessian is :math:`H = \frac{2}{N} X X^\top` for every row of
      :math:`W`: greedy Optimal Brain Surgeon, one weight at a time, removing the weight
      of least :math:`w_q^2 / (2 [H^{-1}]_{qq})` and updating the rest of its row by
      :math:`-\frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q`. With ``allocation="layer"`` (OBC's
      default) the layer's ``round(sparsity * size)`` removals are spread over its rows
      at least total cost: every row is pruned to the end once, recording the cost of
      each removal, the cheapest removals over all rows are taken (each row's costs
      made convex, see below), and each row is pruned again to its own count; with
      ``"row"`` every row loses ``round(sparsity * inputs)``. Cost: :math:`O(\text{outputs}
      \cdot \text{inputs}^3)` per layer (about twice that for ``"layer"``).
    * ``"sparsegpt"``: SparseGPT (Frantar & Alistarh, "SparseGPT: massive language models
      can be accurately pruned in one-shot", ICML 2023): the same objective,
      approximately, for wide layers: one Cholesky factorisation of :math:`H^{-1}`,
      columns pruned left to right with lazy blocked updates (``blocksize``), the mask
      chosen per block over all rows. Cost :math:`O(\text{inputs}^3 + \text{outputs}
      \cdot \text{inputs}^2)`.
    * ``"obd"``: Optimal Brain Damage (LeCun, Denker & Solla, 1990): remove the weights of
      least saliency :math:`\frac12 H_{qq} w_q^2` in each layer, with the diagonal of the
      ``curvature`` of the loss over ``data`` (``diagonal="exact"``: for the GGN of
      ``nn.Linear`` and ``nn.Conv2d`` layers under ``MSELoss``, ``CrossEntropyLoss`` or
      ``BCEWithLogitsLoss``, by backpropagating each column of the output Hessian's
      square root, :math:`\operatorname{diag} G = \sum_{n,k} (\sum_r g_{nkr}
      x_{nr}^\top)^{\odot 2}`, one backward pass per column and output position of a
      sample; otherwise one curvature product per weight; ``"hutchinson"`` or
      ``"xdiag"``: estimated from ``num_matvecs`` products); no update of the other
      weights.
    * ``"obs"``: global Optimal Brain Surgeon (Hassibi & Stork, 1993) on the dense
      ``curvature`` :math:`H` of the loss with respect to all the pruned weights together
      (at most :data:`OBS_MAX_PARAMS` of them), damped: removes, one at a time, the weight
      of least :math:`w_q^2 / (2 [H^{-1}]_{qq})` in any layer still short of its
      sparsity, updates every pruned layer, and downdates :math:`H^{-1}`.

    Layer-wise methods prune the layers in the order the model calls them; with
    ``sequential=True`` (OBC, SparseGPT) each layer's inputs are gathered with the
    layers before it already pruned (one pass over ``data`` per layer), else all from
    the dense model in one pass.

    Args:
        model: the network; only the ``weight`` of the pruned layers changes (biases,
            other parameters, buffers and the train/eval mode are kept). Put it in eval
            mode (dropout makes the passes random and is refused).
        loss_fn: ``loss_fn(outputs, targets)``, a scalar, as for
            :class:`hesse.HessianOperator`: the loss reported before and after, and the
            loss whose curvature ``"obd"`` and ``"obs"`` use.
        data: calibration data in hesse's conventions (a batch ``(inputs, targets)`` or a
            dict holding the targets, or a re-iterable of batches such as a
            ``DataLoader``); see :class:`hesse.ModelIO`.
        sparsity: the share of each layer's weights to remove, in ``[0, 1)``: one float
            for every layer, or ``{layer name: float}`` (layers left out keep their
            weights; its keys select the layers, so ``params`` must then be ``None``).
            Default: ``1 - N/M`` with a pattern, else 0.5. A layer loses
            ``round(sparsity * size)`` weights.
        method: ``"layer-obs"`` (default), ``"sparsegpt"``, ``"magnitude"``, ``"obd"`` or
            ``"obs"``.
        pattern: ``"N:M"`` semi-structured sparsity: ``N`` weights kept in every ``M``
            consecutive inputs of each output (``"2:4"``: sparsity 0.5); the layers'
            inputs must be a multiple of ``M``.
        params: the layers to prune: module names, modules or their weights. Default:
            every ``nn.Linear``, ``nn.Conv2d`` (``groups=1``) and transformers'
            ``Conv1D`` whose weight is not tied to another module's (GPT-2's ``lm_head``
            is left out) and that the model calls as a module (not
            ``nn.MultiheadAttention.out_proj``). Other layers are refused.
        io: a :class:`hesse.ModelIO` for models and batches its defaults do not cover.
        damping: relative damping :math:`\lambda` of the OBS methods: :math:`H +
            \lambda \operatorname{mean}(\operatorname{diag} H) I` (0.01, as OBC and
            SparseGPT; 0 for the exact quadratic model, which needs :math:`H` definite).
        sequential: see above (layer-wise methods).
        blocksize: the columns of one lazy block of ``"sparsegpt"``.
        allocation: how ``"layer-obs"`` without a pattern spreads a layer's removals
            over its rows: ``"layer"`` (default) at least total cost of the greedy
            traces, optimal when each row's cumulative cost is convex in its count
            (else for its lower convex hull); ``"row"``: the same count in every row.
        curvature: ``"ggn"`` (default), ``"fisher"`` (empirical) or ``"hessian"``: the
            curvature of the loss for ``"obd"`` and ``"obs"``.
        diagonal, num_matvecs, seed: how ``"obd"`` gets the diagonal of the curvature
            (see :func:`hesse.diagonal`), or the diagonal itself, a tensor of shape
            ``(P,)`` over the pruned layers' weights (in the order of the layers, each
            weight flattened in its own layout): to prune one model at several
            sparsities with one computation of the diagonal (``hesse.diagonal(
            hesse.GGNOperator(model, loss_fn, data, params=weights), "exact")``).

    Returns:
        A :class:`PruneReport`: per layer the mask, the sparsity reached, the predicted
        and the measured increase; the loss before and after. ``report.register(model)``
        keeps the masks through fine-tuning, ``report.reapply(model)`` zeroes the pruned
        weights again.

    The quadratic model's convention: with :math:`H = \frac{2}{N} X X^\top`, removing
    :math:`q` costs :math:`w_q^2 / (2[H^{-1}]_{qq})`, and the sum of the costs of a
    layer, ``predicted``, equals its reconstruction error :math:`\|(W - \hat W)X\|_F^2 /
    N`, ``measured``, when ``damping=0``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> data = (torch.randn(64, 8), torch.randint(0, 2, (64,)))
        >>> r = prune(model, nn.CrossEntropyLoss(), data, sparsity=0.5)
        >>> r.sparsity, float((model[0].weight == 0).float().mean())
        (0.5, 0.5)
    """
    start = time.perf_counter()
    method = check_choice(method, "method", METHODS)
    nm = parse_pattern(pattern)
    damping = check_real(damping, "damping", 0)
    curvature = check_choice(curvature, "curvature", tuple(CURVATURES))
    if not isinstance(diagonal, Tensor):
        diagonal = check_choice(diagonal, "diagonal", DIAGONAL_METHODS)
    seed = check_seed(seed)
    allocation = check_choice(allocation, "allocation", ALLOCATIONS)
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True or False, got {sequential!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(sparsity, Mapping):
        if params is not None:
            raise ValueError(
                "sparsity is a dict, whose keys select the layers; give params=None, or a "
                "float sparsity with params"
            )
        layers = select_layers(model, list(sparsity))  # keys as modules or weights too
        sparsity = dict(zip([layer.name for layer in layers], sparsity.values()))
    else:
        layers = select_layers(model, params)
    targets = layer_sparsity(sparsity, layers, nm)
    for layer in layers:
        check_finite(layer.weight.detach(), f"the weight of layer {layer.name!r}")
        check_pattern_fits(layer, nm)
    fn = ModelLoss(model, loss_fn, [layer.weight for layer in layers], io, second_order=False)
    data = _check_data(data, io=fn.io)
    loss_before = _loss(fn, data)
    if method in LAYERWISE:
        results = _layerwise(fn, data, layers, targets, method, nm, damping, sequential,
                             blocksize, allocation)  # fmt: skip
        objective = "reconstruction"
    else:
        op = CURVATURES[curvature](model, loss_fn, data, fn.names, io=fn.io)
        results = _global(op, fn, data, layers, targets, method, nm, damping, loss_before,
                          diagonal, num_matvecs, seed)  # fmt: skip
        objective = "loss"
    return PruneReport(
        method=method,
        pattern=None if nm is None else f"{nm[0]}:{nm[1]}",
        objective=objective,
        layers={r.name: r for r in results},
        loss_before=loss_before,
        loss_after=_loss(fn, data),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _loss(fn: ModelLoss, data: Iterable[Any]) -> float:
    """The loss over the data: batches weighted as the curvature operators weight them
    for a mean loss, summed for a sum."""
    mean = getattr(fn.loss_fn, "reduction", "mean") != "sum"
    params = fn.params()
    total = weight = 0.0
    for batch in data:
        n = fn.weight(batch) if mean else 1.0
        if n:
            total += float(fn.loss(params, batch)) * n
            weight += n
    if weight == 0:
        raise ValueError("data is empty: expected at least one batch (inputs, targets)")
    return total / weight


@torch.no_grad()
def _moments(fn: ModelLoss, data: Iterable[Any], layers: Sequence[Layer]) -> InputMoments:
    """One pass over the data, recording the inputs' second moments of ``layers``."""
    params = fn.params()
    with InputMoments(layers) as moments:
        for batch in data:
            fn.forward(params, fn.split(batch)[0])
    return moments


def _layerwise(fn, data, layers, targets, method, nm, damping, sequential, blocksize,
               allocation):  # fmt: skip
    moments = _moments(fn, data, layers)
    by_name = {layer.name: layer for layer in layers}
    order = moments.order + [n for n in by_name if n not in moments.order]
    results = []
    for i, name in enumerate(order):
        layer = by_name[name]
        if sequential and i > 0:  # its inputs, with the layers before it pruned
            moments = _moments(fn, data, [layer])
        H = moments.hessian(name)
        check_finite(H, f"the input Hessian of layer {name!r}")
        weight = layer.weight
        W = layer.matrix(weight.detach()).to(H.dtype, copy=True)
        s = targets[name]
        tic = time.perf_counter()
        if method == "magnitude":
            mask = select(W * W, s, nm)
            W_new, cost = W * mask, None
        else:
            Hinv = inverse(damped(H, damping), f"the input Hessian of layer {name!r}, damped,")
            if method == "layer-obs":
                W_new, mask, cost = exact_obs(W, Hinv, s, nm, allocation)
            else:
                W_new, mask, cost = sparsegpt(W, Hinv, s, nm, blocksize)
        seconds = time.perf_counter() - tic
        check_finite(W_new, f"the pruned weight of layer {name!r}")
        with torch.no_grad():
            weight.copy_(layer.from_matrix(W_new.to(weight.dtype)))
        D = W_new - W
        measured = float(((D @ H) * D).sum() / 2)
        results.append(_row(layer, mask, cost, measured, seconds))
    return results


def _row(layer: Layer, mask: Tensor, cost: Tensor | None, measured: float, seconds: float):
    return LayerPrune(
        name=layer.name,
        kind=layer.kind,
        shape=layer.shape,
        mask=layer.from_matrix(mask).contiguous(),
        sparsity=1 - float(mask.sum()) / mask.numel(),
        predicted=None if cost is None else float(cost.sum()),
        measured=measured,
        seconds=seconds,
    )


def _global(op, fn, data, layers, targets, method, nm, damping, loss_before, diagonal,
            num_matvecs, seed):  # fmt: skip
    # the flat vector of the operator lists the weights in their own layout; the
    # methods see each layer as its (outputs, inputs) matrix: ``perm`` maps one to the other
    sizes = [layer.weight.numel() for layer in layers]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    perm = torch.cat(
        [
            layer.matrix(torch.arange(n, device=op.device).view(layer.weight.shape)).reshape(-1)
            + off
            for layer, n, off in zip(layers, sizes, offsets)
        ]
    )
    w = torch.cat([layer.matrix(layer.weight.detach()).reshape(-1) for layer in layers])
    tic = time.perf_counter()
    if method == "obd":
        diag = _diagonal(op, fn, data, layers, diagonal, num_matvecs, seed)
        # a stochastic estimate can be negative where the GGN's diagonal is not
        saliency = diag[perm].clamp_min(0) * w * w / 2
        masks, costs = [], []
        for layer, piece in zip(layers, torch.split(saliency, sizes)):
            scores = piece.view(layer.shape)
            masks.append(select(scores, targets[layer.name], nm))
            costs.append(scores * ~masks[-1])
        mask = torch.cat([m.reshape(-1) for m in masks])
        w_new, cost = w * mask, torch.cat([c.reshape(-1) for c in costs])
    else:
        if w.numel() > OBS_MAX_PARAMS:
            raise ValueError(
                f"method='obs' holds the dense inverse curvature of the pruned weights, at "
                f"most OBS_MAX_PARAMS = {OBS_MAX_PARAMS:,} of them; these layers have "
                f"{w.numel():,}: select fewer with params=, or use method='layer-obs' or "
                "'sparsegpt'"
            )
        H = op.to_dense()[perm][:, perm]
        H = (H + H.T) / 2
        check_finite(H, "the curvature of the loss")
        Hinv = inverse(
            damped(H, damping), f"the {type(op).__name__} of the pruned weights, damped,"
        )
        groups, quota = _global_groups(layers, targets, nm, op.device)
        w_new, mask, cost = (t[0] for t in greedy_obs(w[None], Hinv, groups, quota[None]))
    seconds = (time.perf_counter() - tic) / len(layers)
    check_finite(w_new, "the pruned weights")
    new = [
        layer.from_matrix(piece.view(layer.shape)).to(layer.weight.dtype)
        for layer, piece in zip(layers, torch.split(w_new, sizes))
    ]
    results = []
    with torch.no_grad():
        for layer, value, m, c in zip(
            layers, new, torch.split(mask, sizes), torch.split(cost, sizes)
        ):  # each layer alone, for its measured increase
            old = layer.weight.detach().clone()
            layer.weight.copy_(value)
            measured = _loss(fn, data) - loss_before
            layer.weight.copy_(old)
            results.append(_row(layer, m.view(layer.shape), c, measured, seconds))
        for layer, value in zip(layers, new):
            layer.weight.copy_(value)
    return results


def _diagonal(op, fn, data, layers, diagonal, num_matvecs: int, seed: int | None) -> Tensor:
    """The diagonal of the curvature: given; the GGN's exactly by backpropagating the
    output Hessian's square root (:func:`ggn_diagonal`) where it applies; else computed by
    :func:`hesse.diagonal`."""
    if isinstance(diagonal, Tensor):
        if diagonal.shape != (op.shape[0],):
            raise ValueError(
                f"diagonal must have shape ({op.shape[0]},), one entry per pruned weight, "
                f"got shape {tuple(diagonal.shape)}"
            )
        check_finite(diagonal, "diagonal")
        return diagonal.to(device=op.device, dtype=op.dtype)
    if diagonal == "exact" and type(op) is GGNOperator and covered(layers, fn.loss_fn):
        return ggn_diagonal(fn.model, fn.loss_fn, data, layers, fn.io)
    result = diagonal_of(op, method=diagonal, num_matvecs=num_matvecs, seed=seed)
    if not result.success:
        raise ValueError(f"the diagonal of the curvature failed: {result.message}")
    return result.estimate


def _global_groups(layers, targets, nm, device) -> tuple[Tensor, Tensor]:
    """The groups of global OBS over the concatenated layers and their quotas: one group
    per layer (``round(sparsity * size)`` removals), or one per N:M group."""
    groups, quota, first = [], [], 0
    for i, layer in enumerate(layers):
        rows, cols = layer.shape
        if nm is None:
            groups.append(torch.full((rows * cols,), i, dtype=torch.long, device=device))
            quota.append(count(targets[layer.name], rows * cols))
        else:
            g = torch.arange(rows * cols, device=device) // nm[1]
            groups.append(g + first)
            quota += [nm[1] - nm[0]] * (rows * cols // nm[1])
            first += rows * cols // nm[1]
    if nm is None:
        first = len(layers)
    return torch.cat(groups), torch.tensor(quota, dtype=torch.long, device=device)
