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
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    state = {"spent": False}

    def product(cols: Columns) -> Columns:
        k = cols[0].shape[0]
        if not live:
            return tuple(torch.zeros_like(c) for c in cols)
        if state["spent"]:
            raise RuntimeError("this product was built for one application (reuse=False)")
        rows = []
        with torch.enable_grad():
            for j in range(k):
                retain = reuse or j < k - 1
                rows.append(
                    _grad(
                        [grads[i] for i in live], leaves, [cols[i][j] for i in live], retain=retain
                    )
                )
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
