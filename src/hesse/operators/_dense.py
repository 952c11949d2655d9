r"""A model's curvature on one batch as a dense ``(P, P)`` matrix, in one batched pass:
the GGN or the Hessian, from per-sample Jacobians (or, for a generalised linear model, the
closed form :math:`X^\top \operatorname{diag}(h) X`). What the subsampled Newton methods
solve by Cholesky when ``P`` is small (:class:`hesse.optim.SubsampledNewton`, and a data
problem's :meth:`hesse.problems.Problem.objective`), where a Hessian-vector product per
column would cost ``P`` passes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vmap

from hesse.func._io import map_tensors, take_samples
from hesse.func._model import ModelLoss
from hesse.func._output import OutputCurvature

#: Entries (of the working precision) the dense curvature's Jacobians may take at once: a
#: subsample whose Jacobian is larger is formed in chunks of samples (128 MiB in float64).
DENSE_ENTRIES = 2**24


def dense_model_curvature(
    fn: ModelLoss, curvature: OutputCurvature, batch: Any, *, hessian: bool, second_term=True
) -> Tensor | None:
    r"""The GGN :math:`G = J^\top \nabla^2_o \ell\, J` (or, with ``hessian``, the Hessian
    :math:`G + \sum_k \partial_{o_k}\ell\, \nabla^2_\theta o_k`) of ``fn``'s loss on one
    batch, as a dense ``(P, P)`` matrix, in one batched pass: the per-sample Jacobians
    :math:`J_i` by reverse mode under ``vmap`` (for a linear model, the features
    themselves), :math:`\nabla^2_o \ell` applied by :class:`OutputCurvature`'s closed forms,
    then one matrix product. For a generalised linear model (an ``nn.Linear``) the
    closed form :math:`X^\top \operatorname{diag}(h) X` per block of outputs, without
    Jacobians (:func:`_linear_model_curvature`). The Hessian's second term is formed (by
    forward-over-reverse under ``vmap``) only when the model's outputs are not linear in the
    parameters, which autograd is asked once, on two samples (:func:`_has_second_term`).

    A batch whose Jacobian has more than :data:`DENSE_ENTRIES` entries is formed in chunks
    of samples, each weighted as :class:`~hesse.operators.GGNOperator` weights the batches
    of a list (the subsample as a list of smaller batches).

    With ``second_term=False``, ``None`` (nothing formed) where the Hessian has a second
    term: its ``P`` forward-over-reverse passes cost more than ``P`` Hessian-vector
    products through a kept graph, 128 columns at a time (an MLP with ``P = 963`` on
    3852 samples: 12.1 s against 2.7 s per subsampled Newton step; the GGN in one pass,
    1.3 s against 2.9 s). Whether it has one is asked of autograd on two samples first.
    """
    P = fn.size
    io = fn.io
    n = io.samples(batch)
    glm = _linear_model_curvature(fn, curvature, batch)
    if glm is not None:
        return glm
    params = fn.params()
    second = hessian and _has_second_term(fn, params, batch, n)
    if second and not second_term:
        return None
    eye = torch.eye(P, dtype=fn.space.dtype, device=fn.space.device)
    cols = fn.space.unflatten_columns(eye) if second else None  # tangents of the 2nd term
    head = min(n, 2)  # the outputs of a sample or two give their size per sample
    out = fn.outputs(params, fn.split(take_samples(batch, n, slice(0, head)))[0])
    per_sample = max(1, out.numel() // max(head, 1))
    chunk = max(1, DENSE_ENTRIES // (P * per_sample))
    parts = []
    for a in range(0, n, chunk):
        part = batch if chunk >= n else take_samples(batch, n, slice(a, min(a + chunk, n)))
        parts.append((_dense_part(fn, curvature, part, params, cols), fn.weight(part)))
    if len(parts) == 1:
        return parts[0][0]
    if getattr(fn.loss_fn, "reduction", "mean") == "sum":
        return sum(H for H, _ in parts)
    total = sum(w for _, w in parts)
    return sum(H * (w / total) for H, w in parts)


def _has_second_term(fn: ModelLoss, params, batch: Any, n: int) -> bool:
    """Whether the model's outputs on a sample or two are not linear in the parameters
    (the gradient of a fixed combination of them still depends on the parameters)."""
    inputs, _ = fn.split(take_samples(batch, n, slice(0, min(n, 2))))
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_() for p in params)
        out = fn.outputs(leaves, inputs)
        got = torch.autograd.grad(out.sum(), leaves, create_graph=True, allow_unused=True)
    return any(t is not None and t.requires_grad for t in got)


def _linear_model_curvature(fn: ModelLoss, curvature: OutputCurvature, batch: Any):
    r"""The closed form for a generalised linear model (the model an ``nn.Linear`` on a
    tensor of inputs, its weight and bias the parameters): with :math:`M_i` the output
    Hessian of sample :math:`i` (:class:`OutputCurvature`), the block of outputs
    :math:`(a, b)` is :math:`X^\top \operatorname{diag}(M_{\cdot ab}) X` (and the bias rows
    :math:`X^\top M_{\cdot ab}`, :math:`\sum_i M_{iab}`): one matrix product per block,
    no Jacobian. ``None`` where it does not apply. The Hessian is the same matrix (the
    outputs are linear in the parameters)."""
    model = fn.model
    if not isinstance(model, nn.Linear) or (fn.io.output, fn.io.call) != ("auto", "auto"):
        return None
    names = fn.names
    if names not in (("weight",), ("weight", "bias")):
        return None
    try:
        X, targets = fn.split(batch)
    except (TypeError, ValueError):
        return None
    if not isinstance(X, Tensor) or X.dim() != 2:
        return None
    out = fn.outputs(fn.params(), X).detach()
    curvature.check_targets(out, targets)
    o, d = out.shape[1], X.shape[1]
    eye = torch.eye(o, dtype=out.dtype, device=out.device)
    # M[a] = M_i e_a for every sample: (o, S, o), from the closed forms
    M = curvature.hessian_mm(out, targets, eye[:, None, :].expand(o, *out.shape))
    bias = len(names) == 2
    P = o * d + (o if bias else 0)
    H = torch.empty(P, P, dtype=out.dtype, device=out.device)
    for a in range(o):
        for b in range(a, o):
            m = M[a, :, b]  # (S,): the (a, b) entry of each sample's output Hessian
            Xm = X * m[:, None]
            H[a * d : (a + 1) * d, b * d : (b + 1) * d] = X.T @ Xm
            if bias:
                xb = Xm.sum(0)
                H[a * d : (a + 1) * d, o * d + b] = xb
                H[o * d + a, o * d + b] = m.sum()
                H[o * d + b, a * d : (a + 1) * d] = xb
            if b != a:  # the symmetric blocks
                H[b * d : (b + 1) * d, a * d : (a + 1) * d] = H[
                    a * d : (a + 1) * d, b * d : (b + 1) * d
                ].T
                if bias:
                    H[b * d : (b + 1) * d, o * d + a] = xb
                    H[o * d + a, b * d : (b + 1) * d] = xb
                    H[o * d + b, o * d + a] = H[o * d + a, o * d + b]
    return H


def _dense_part(fn: ModelLoss, curvature: OutputCurvature, batch, params, cols):
    """The GGN on ``batch``, plus the Hessian's second term along the tangents ``cols``
    where given (the outputs are not linear in the parameters)."""
    P = fn.size
    inputs, targets = fn.split(batch)
    out = fn.outputs(params, inputs).detach()
    curvature.check_targets(out, targets)

    def one(ps, x):  # the outputs of one sample, as a batch of one
        return fn.outputs(ps, map_tensors(x, lambda t: t.unsqueeze(0)))[0]

    # Per-sample Jacobians by reverse mode under vmap: O(outputs x a backward pass) per
    # sample, where forward mode over the P columns would cost P forward passes.
    J = vmap(jacrev(one), in_dims=(None, 0))(params, inputs)
    n = out.shape[0]
    Jt = torch.cat([j.reshape(n, -1, j[0].numel() // max(1, out[0].numel())) for j in J], 2)
    Jt = Jt.permute(2, 0, 1).reshape(P, *out.shape)  # row j: J e_j
    MJ = curvature.hessian_mm(out, targets, Jt)
    H = Jt.reshape(P, -1) @ MJ.reshape(P, -1).T
    if cols is not None:
        with torch.enable_grad():
            o = out.detach().requires_grad_()
            r = torch.autograd.grad(fn.loss_fn(o, targets), o)[0].detach()  # d loss / d o
        g_r = grad(
            lambda *ps: (r * fn.outputs(ps, inputs)).sum(),
            argnums=tuple(range(len(params))),
        )
        R = vmap(lambda *t: jvp(g_r, params, t)[1])(*cols)
        H = H + fn.space.flatten_columns(R)
    return H
