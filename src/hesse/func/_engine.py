r"""The products at one point, built on :mod:`torch.autograd`.

Every curvature product in hesse goes through one of two builders here:

* :func:`hvp_product` — :math:`H v` by reverse-over-reverse differentiation: one forward
  pass and one backward pass that records its own graph, then one backward pass through
  that graph per column;
* :func:`jmj_product` — :math:`J^\top M J v` (Gauss-Newton, Fisher) for a matrix :math:`M`
  in the space of the outputs.

Each builder does the work that does not depend on the columns at once and returns a
function of the columns (a tuple of tensors of shape ``(k, *param.shape)``). With
``reuse=True`` the graphs are kept so that the function can be applied many times at the
same point (CG, Lanczos); otherwise they are freed by the last column of the first
application, which keeps the peak memory of a single product low.

Plain autograd rather than :mod:`torch.func` here: measured with
``benchmarks/hvp_cost.py``, ``torch.func``'s per-operation wrapping made a reverse-over-
reverse product about 20% slower on the MLP of the foundation issue on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

Columns = tuple[Tensor, ...]
ColumnProduct = Callable[[Columns], Columns]


def _leaves(params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(p.detach().requires_grad_() for p in params)


def _grad(outputs, inputs, grad_outputs, retain: bool, create: bool = False) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros (not ``None``) for inputs that do not matter."""
    got = torch.autograd.grad(
        outputs, inputs, grad_outputs, retain_graph=retain, create_graph=create, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def graph_hvp(
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    batched: bool = False,
    retain: bool = True,
) -> list[Tensor]:
    r""":math:`H v` through a kept graph: ``grads`` is the gradient of one scalar with
    respect to ``inputs``, built with ``create_graph=True``; ``vs`` holds one tensor per
    input, shaped like it, or with a leading dimension of ``k`` columns when ``batched``
    (all ``k`` in one backward pass, one at a time for an operation without a batching
    rule). Zeros where a gradient has no graph (the scalar is linear in that input) or does
    not reach an input. ``retain=False`` frees the graph (unbatched only).

    The one Hessian-vector product through a kept graph: the operators' products
    (:func:`hvp_product`), ``hesse.minimize``'s points and the optimizers' evaluations all
    call it.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
        >>> graph_hvp([g], [x], [torch.tensor([1.0, 1.0])])[0]  # diag(6 x) v
        tensor([ 6., 12.])
        >>> graph_hvp([g], [x], [torch.eye(2)], batched=True)[0]
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(v) for v in vs]
    outputs, cols = [grads[i] for i in live], [vs[i] for i in live]
    with torch.enable_grad():
        if not batched:
            return _grad(outputs, inputs, cols, retain)
        k = vs[0].shape[0]
        try:
            got = torch.autograd.grad(
                outputs, inputs, cols, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        except RuntimeError:  # an operation without a batching rule: a column at a time
            rows = [_grad(outputs, inputs, [c[j] for c in cols], True) for j in range(k)]
            return [torch.stack(t) for t in zip(*rows)]
    return [
        x.new_zeros((k, *x.shape)) if h is None else h for h, x in zip(got, inputs, strict=True)
    ]


#: The most columns :func:`flat_graph_hvp` sends through a graph in one batched pass: a
#: batched backward holds the graph's intermediates once per column, so that a dense
#: Hessian (``n`` columns) of a network on a whole dataset would otherwise need ``n`` times
#: the memory of a gradient (a CNN with 3818 parameters on 1347 digits: over 20 GB).
MAX_BATCHED_COLUMNS = 128


def flat_graph_hvp(g: Tensor, x: Tensor, V: Tensor, retain: bool = True) -> Tensor:
    """:func:`graph_hvp` for one flat input ``x`` and the flat gradient ``g`` of a
    function of it: ``V`` is ``(n,)`` or ``(n, k)`` and so is the result (columns in
    batched passes of at most :data:`MAX_BATCHED_COLUMNS`)."""
    if V.dim() == 1:
        return graph_hvp([g], [x], [V], retain=retain)[0]
    if V.shape[1] == 1:
        return graph_hvp([g], [x], [V[:, 0]], retain=retain)[0].unsqueeze(1)
    step = MAX_BATCHED_COLUMNS
    blocks = [
        graph_hvp([g], [x], [V[:, j : j + step].T], batched=True)[0].T
        for j in range(0, V.shape[1], step)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)


def _stack(rows: list[list[Tensor]]) -> Columns:
    if len(rows) == 1:  # one column: a view, no copy
        return tuple(t.unsqueeze(0) for t in rows[0])
    return tuple(torch.stack(t) for t in zip(*rows))


def hvp_product(
    loss_fn: Callable[[tuple[Tensor, ...]], Tensor],
    params: Sequence[Tensor],
    reuse: bool = False,
) -> ColumnProduct:
    """Build ``cols -> H cols`` for the Hessian of ``loss_fn`` at ``params``."""
    with torch.enable_grad():
        leaves = _leaves(params)
        value = loss_fn(leaves)
        # A loss that none of the selected parameters reaches (a parameter the forward pass
        # does not use) has no graph: its Hessian in those directions is zero.
        if value.requires_grad:
            grads = _grad(value, leaves, None, retain=True, create=True)
        else:
            grads = [torch.zeros_like(x) for x in leaves]
    # A gradient that does not depend on the parameters (a linear term) has no graph: it
    # contributes nothing to H v.
    linear = not any(g.requires_grad for g in grads)
    state = {"spent": False}

    def product(cols: Columns) -> Columns:
        k = cols[0].shape[0]
        if linear:
            return tuple(torch.zeros_like(c) for c in cols)
        if state["spent"]:
            raise RuntimeError("this product was built for one application (reuse=False)")
        rows = [
            graph_hvp(grads, leaves, [c[j] for c in cols], retain=reuse or j < k - 1)
            for j in range(k)
        ]
        state["spent"] = not reuse
        return _stack(rows)

    return product


def jmj_product(
    out_fn: Callable[[tuple[Tensor, ...]], Tensor],
    params: Sequence[Tensor],
    make_out_mm: Callable[[Tensor], Callable[[Tensor], Tensor]],
    reuse: bool = False,
) -> ColumnProduct:
    r"""Build ``cols -> J^T M J cols`` at ``params``.

    ``out_fn(params)`` gives the outputs ``o``; ``make_out_mm(o)`` returns the function that
    applies :math:`M` to ``U`` of shape ``(k, *o.shape)``.

    For a single column used once, :math:`J v` comes from a forward pass in forward-mode AD
    that also records the graph for :math:`J^\top` (one dual forward, one backward). For
    several columns or ``reuse``, the graph of :math:`u \mapsto J^\top u` is recorded once
    (it is linear in :math:`u`), :math:`J v` is its vjp, and no forward pass is repeated.
    """
    if not reuse:
        state: dict[str, Any] = {"used": False}

        def single(cols: Columns) -> Columns:
            if cols[0].shape[0] == 1 and not state["used"]:
                state["used"] = True
                out = _dual_jmj(out_fn, params, make_out_mm, cols)
                if out is not None:
                    return out
            return _cached_jmj(out_fn, params, make_out_mm, reuse=False)(cols)

        return single
    return _cached_jmj(out_fn, params, make_out_mm, reuse=True)


def _dual_jmj(out_fn, params, make_out_mm, cols: Columns) -> Columns | None:
    try:
        with torch.enable_grad(), fwAD.dual_level():
            leaves = _leaves(params)
            duals = tuple(fwAD.make_dual(p, c[0]) for p, c in zip(leaves, cols))
            out, jv = fwAD.unpack_dual(out_fn(duals))
    except (NotImplementedError, RuntimeError):
        return None  # an op without a forward-mode derivative: the caller uses the vjp route
    if jv is None:
        jv = torch.zeros_like(out)
    w = make_out_mm(out.detach())(jv.detach().unsqueeze(0))[0]
    if not out.requires_grad:
        return tuple(torch.zeros_like(c) for c in cols)
    with torch.enable_grad():
        return _stack([_grad(out, leaves, w, retain=False)])


def _cached_jmj(out_fn, params, make_out_mm, reuse: bool) -> ColumnProduct:
    with torch.enable_grad():
        leaves = _leaves(params)
        out = out_fn(leaves)
        if not out.requires_grad:
            return lambda cols: tuple(torch.zeros_like(c) for c in cols)
        u = torch.zeros_like(out, requires_grad=True)
        # J^T u, recorded with its graph; it is linear in u, so J v = d<J^T u, v>/du.
        jtu = _grad(out, leaves, u, retain=True, create=True)
    live = [i for i, g in enumerate(jtu) if g.requires_grad]
    out_mm = make_out_mm(out.detach())

    def product(cols: Columns) -> Columns:
        k = cols[0].shape[0]
        with torch.enable_grad():
            jv = (
                torch.stack(
                    [
                        _grad([jtu[i] for i in live], [u], [cols[i][j] for i in live], retain=True)[
                            0
                        ]
                        for j in range(k)
                    ]
                )
                if live
                else torch.zeros((k, *out.shape), dtype=out.dtype, device=out.device)
            )
            W = out_mm(jv)
            rows = [_grad(out, leaves, W[j], retain=reuse or j < k - 1) for j in range(k)]
        return _stack(rows)

    return product
