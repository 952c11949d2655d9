r"""Kronecker-factored curvature: KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions; Eschenhagen et al. 2023 for weight sharing) and EKFAC (George et al. 2018).

A layer :math:`s = W x + b` (``nn.Linear``; ``nn.Conv2d`` on the patches of its input)
with weight and bias joined into :math:`\bar W = [W \; b]` and the input extended by a one,
:math:`\bar x = [x; 1]`, has the Gauss-Newton block

.. math:: G_{\bar W} = \sum_i \sum_k \operatorname{vec}(g_{ik} \bar x_i^\top)
    \operatorname{vec}(g_{ik} \bar x_i^\top)^\top,
    \qquad g_{ik} = \frac{\partial f_i}{\partial s_i}^{\!\top} S_{ik},

with :math:`S_{ik}` the columns of a square root of the output Hessian
(:math:`\nabla^2_f \ell = \sum_k S_k S_k^\top`; ``fisher="type-2"``), of draws from the
model's predictive distribution (``"mc"``) or the loss's gradient (``"empirical"``). KFAC
replaces it by :math:`G \otimes A` (row-major ``vec``, hesse's flat layout) with

.. math:: A = \frac{1}{N}\sum_i \bar x_i \bar x_i^\top, \qquad
    G = \sum_i \sum_k g_{ik} g_{ik}^\top,

exact when either factor is the same for every sample (deep linear networks with a
squared error; a single sample). With weight sharing over positions :math:`r = 1..R`
(sequences, the output locations of a convolution), ``"expand"`` takes every position as a
sample (:math:`A = \frac{1}{NR}\sum_{i,r} \bar x_{ir} \bar x_{ir}^\top`, :math:`G = \sum_{i,r,k}
g_{irk} g_{irk}^\top`; exact when the loss is a sum over positions that do not interact)
and ``"reduce"`` the mean input and the summed gradient of each sample (:math:`A =
\frac1N\sum_i \bar x_i \bar x_i^\top` with :math:`\bar x_i = \frac1R\sum_r \bar x_{ir}`,
:math:`G = \sum_{i,k} (\sum_r g_{irk})(\sum_r g_{irk})^\top`; exact when the positions are
pooled before the loss). Over several batches :math:`A` is averaged by samples and
:math:`G` by the batches' weights (:meth:`hesse.func.ModelLoss.weight`), as every hesse
operator averages a mean loss; summed for ``reduction="sum"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hesse._core import all_finite, check_finite
from hesse._core._checks import check_choice
from hesse._core._progress import report
from hesse.func._model import ModelLoss
from hesse.func._output import OutputCurvature, _loss_gradient, _valid_classes
from hesse.operators._base import NONFINITE_LOSS, CurvatureOperator
from hesse.operators._model import _check_data, _start_pass

FISHER_TYPES = ("type-2", "mc", "empirical")
WEIGHT_SHARING = ("expand", "reduce")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
DAMPING_METHODS = ("exact", "pi")


@dataclass
class KroneckerBlock:
    r"""One layer's block :math:`G \otimes A` of a Kronecker-factored operator.

    The block acts on the layer's parameters as one matrix :math:`\bar W = [W \; b]` of
    shape ``(out, d)`` (a convolution's kernel flattened to ``(out, in * kh * kw)``),
    vectorised row-major: :math:`\bar W \mapsto G \bar W A`. In the operator's flat
    vector the weight's entries and the bias's sit where ``params`` puts them.

    Attributes:
        module: the layer's name in the model.
        params: the names of its selected parameters (weight, bias or both), as in the
            operator's flat vector.
        A: the input factor, ``(d, d)``: ``d`` is the weight's input dimension (its
            ``in_channels * kh * kw`` for a convolution) plus one when the bias is
            selected with the weight; ``[[1]]`` for a bias alone.
        G: the output-gradient factor, ``(out, out)``.
        eigenvalues: EKFAC's refitted eigenvalues, ``(out, d)`` in the eigenbasis of
            ``G`` and ``A`` (``None`` for KFAC).
    """

    module: str
    params: tuple[str, ...]
    A: Tensor
    G: Tensor
    eigenvalues: Tensor | None = None
    _eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(eigenvalues of A, eigenvectors of A, eigenvalues of G, eigenvectors of G)``,
        computed on first use and kept until the factors change. Eigenvalues are clipped at
        0 (the factors are positive semidefinite; rounding can make them slightly not)."""
        if self._eig is None:
            la, qa = torch.linalg.eigh(self.A)
            lg, qg = torch.linalg.eigh(self.G)
            self._eig = (la.clamp_min(0), qa, lg.clamp_min(0), qg)
        return self._eig


@dataclass
class _Layer:
    """Where a supported layer's selected parameters sit in the flat vector."""

    name: str
    module: nn.Module
    weight: int | None  # index of the weight among the selected parameters
    bias: int | None
    out: int  # output features / channels
    d_w: int  # columns of the weight matrix (0 without the weight)

    @property
    def d(self) -> int:
        return self.d_w + (1 if self.bias is not None else 0)


def _layers(fn: ModelLoss, strict: bool = True) -> list[_Layer]:
    """The supported layers that hold the selected parameters; a clear error if some
    parameter is elsewhere (``strict=False``: those are left out)."""
    selected = {id(p): i for i, p in enumerate(fn._selected)}
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in fn.model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and id(p) in selected:
                owners.setdefault(id(p), []).append((mname, module, pname))
    layers: dict[str, _Layer] = {}
    unsupported, shared = [], []
    for p, i in selected.items():
        found = owners.get(p, [])
        if len({id(m) for _, m, _ in found}) > 1:
            shared.append(f"{fn.names[i]} (in {sorted({n for n, _, _ in found})})")
            continue
        mname, module, pname = found[0]
        if not isinstance(module, SUPPORTED_LAYERS) or pname not in ("weight", "bias"):
            unsupported.append(f"{fn.names[i]} ({type(module).__name__})")
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            unsupported.append(f"{fn.names[i]} (Conv2d with groups={module.groups})")
            continue
        layer = layers.get(mname)
        if layer is None:
            out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            layer = layers[mname] = _Layer(mname, module, None, None, out, 0)
        if pname == "weight":
            layer.weight, layer.d_w = i, module.weight[0].numel()
        else:
            layer.bias = i
    if (unsupported or shared) and strict:
        parts = []
        if unsupported:
            parts.append(
                "parameters of layers KFAC does not cover (it covers nn.Linear and nn.Conv2d "
                f"with groups=1): {', '.join(unsupported)}"
            )
        if shared:
            parts.append(f"parameters shared by several modules: {', '.join(shared)}")
        raise ValueError("; ".join(parts) + "; select the others with params= (names or tensors)")
    # blocks in the order of their first parameter in the flat vector
    return sorted(
        layers.values(), key=lambda la: min(i for i in (la.weight, la.bias) if i is not None)
    )


def _likelihood_scales(curv: OutputCurvature, out: Tensor, targets: Any) -> Tensor:
    r"""The scales :math:`a_{pos}` of a loss written as a function, :math:`\sum_{pos}
    a_{pos} \mathrm{NLL}_{pos}` of its named likelihood, from its gradient at two target
    values (``(N, ..., 1)`` for a categorical, elementwise otherwise): for a categorical
    :math:`g(y{=}0) - g(y{=}1) = a (e_1 - e_0)`, a Bernoulli :math:`g(0) - g(1) = a`, a
    Gaussian :math:`g(y) - g(y{+}1) = 2a`. The gradient at the true targets must then be
    :math:`a` times the NLL's (checked), as :class:`~hesse.func.OutputCurvature` checks it
    for the Monte-Carlo Fisher."""
    lik, fn = curv.likelihood, curv.loss_fn
    out = out.detach()
    if lik == "categorical":
        n_cls = out.shape[-1]
        if n_cls < 2:
            raise ValueError("likelihood='categorical' needs at least two classes")
        valid = _valid_classes(targets, out.shape, out.dim() - 1, "likelihood='categorical'")
        g0 = _loss_gradient(fn, out, torch.where(valid, 0, targets))
        g1 = _loss_gradient(fn, out, torch.where(valid, 1, targets))
        a = (g0 - g1)[..., 1:2]
        p = torch.softmax(out, dim=-1)
        s = (p - F.one_hot(targets.clamp(0, n_cls - 1), n_cls).to(out.dtype)) * valid[..., None]
    elif lik == "bernoulli":
        y = targets.to(out.dtype) if isinstance(targets, Tensor) else targets
        a = _loss_gradient(fn, out, torch.zeros_like(out)) - _loss_gradient(
            fn, out, torch.ones_like(out)
        )
        s = torch.sigmoid(out) - y
    else:  # gaussian
        y = targets.to(out.dtype) if isinstance(targets, Tensor) else targets
        a = (_loss_gradient(fn, out, y) - _loss_gradient(fn, out, y + 1)) / 2
        s = 2 * (out - y)
    g = _loss_gradient(fn, out, targets)
    resid, scale = (g - a * s).norm(), g.norm() + (a * s).norm()
    if resid > max(1e-3, 30 * torch.finfo(out.dtype).eps) * scale or bool((a < 0).any()):
        raise ValueError(
            f"fisher='type-2' with likelihood={lik!r} needs loss_fn(o, y) = sum_pos a_pos "
            f"NLL(o_pos, y_pos) with a_pos >= 0 that do not depend on the targets (no label "
            "smoothing); this loss's gradient is not of that form: use fisher='mc' or "
            "'empirical', or a torch.nn loss"
        )
    return a


def _hessian_sqrt(curv: OutputCurvature, out: Tensor, targets: Any) -> Tensor:
    r"""Columns ``S`` of shape ``(K, *out.shape)`` with :math:`\nabla^2_o \ell = \sum_k S_k
    S_k^\top`; column ``k`` holds, at every position, the ``k``-th column of that
    position's square root (class dimension 1 for cross-entropy, the last dimension for a
    squared error or binary cross-entropy), so that ``K`` backward passes serve every
    sample and position at once."""
    if curv.kind == "generic":  # a function with a named likelihood
        a = _likelihood_scales(curv, out, targets)
        if curv.likelihood == "categorical":
            p = torch.softmax(out.detach(), dim=-1)
            n_cls = out.shape[-1]
            eye = torch.eye(n_cls, dtype=out.dtype, device=out.device)
            eye = eye.view(n_cls, *[1] * (out.dim() - 1), n_cls)
            scale = (a * p).sqrt().movedim(-1, 0).unsqueeze(-1)  # (C, N, ..., 1)
            return (eye - p.unsqueeze(0)) * scale
        s = torch.sigmoid(out.detach())
        diag = 2 * a if curv.likelihood == "gaussian" else a * s * (1 - s)
        return _diagonal_sqrt(diag)
    if not curv._closed_form(out, targets):
        raise ValueError(
            f"fisher='type-2' needs outputs and targets of one shape ({curv.kind}), or "
            "logits (N, C, ...) with class indices (N, ...) for cross-entropy; got outputs "
            f"{tuple(out.shape)} and targets {tuple(getattr(targets, 'shape', ()))}"
        )
    out = out.detach()
    if curv.kind == "cross_entropy":
        # a (diag p - p p^T) = sum_j S_j S_j^T with S_j = sqrt(a p_j) (e_j - p)
        n_cls = out.shape[1]
        p = torch.softmax(out, dim=1)
        a = curv._ce_scales(out, targets, hessian=True)
        eye = torch.eye(n_cls, dtype=out.dtype, device=out.device)
        eye = eye.view(n_cls, 1, n_cls, *[1] * (out.dim() - 2))
        scale = (a * p).sqrt().movedim(1, 0).unsqueeze(2)  # (C, N, 1, ...)
        return (eye - p.unsqueeze(0)) * scale
    if curv.kind == "mse":
        diag = torch.full_like(out, 2.0 / out.numel() if curv.reduction == "mean" else 2.0)
    else:  # bce_logits
        s = torch.sigmoid(out)
        diag = curv._bce_scales(out, targets, True) * s * (1 - s)
    return _diagonal_sqrt(diag)


def _diagonal_sqrt(diag: Tensor) -> Tensor:
    """Columns of the square root of an elementwise output Hessian, one per index of the
    last dimension."""
    if diag.dim() < 2:
        return diag.sqrt().unsqueeze(0)
    k = diag.shape[-1]
    eye = torch.eye(k, dtype=diag.dtype, device=diag.device).view(k, *[1] * (diag.dim() - 1), k)
    return eye * diag.sqrt().unsqueeze(0)


class KFACOperator(CurvatureOperator):
    r"""The Kronecker-factored approximation (KFAC) of the Gauss-Newton matrix or Fisher.

    Block diagonal over layers, each block :math:`G \otimes A` over the flat entries of the
    layer's weight and bias (row-major, hesse's layout: ``K @ v`` compares with
    ``GGNOperator(...) @ v`` for the same ``params``); see :mod:`hesse.operators._kfac` for
    the factors. The factors are computed when the operator is made, with one pass over
    ``data`` at the current parameters; :meth:`update` computes them again.

    Args:
        model, loss_fn, data, params, io: as :class:`hesse.GGNOperator`. Every selected
            parameter must belong to an ``nn.Linear`` or an ``nn.Conv2d`` (``groups=1``);
            select the others out with ``params=``.
        fisher: ``"type-2"`` (the exact output Hessian's square root, one backward pass
            per class: KFAC of the GGN; ``MSELoss``, ``CrossEntropyLoss``,
            ``BCEWithLogitsLoss`` or a named ``likelihood``), ``"mc"`` (``mc_samples``
            labels drawn from the model's predictive distribution per sample) or
            ``"empirical"`` (the gradient at the true targets).
        mc_samples: draws per sample for ``fisher="mc"``.
        generator: the source of the draws' seed (``fisher="mc"``).
        weight_sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023), for layers
            that see sequences (inputs ``(N, ..., d)``) and for convolutions.
        likelihood: for a loss written as a function, the likelihood behind it (as
            :class:`hesse.FisherOperator`: ``"categorical"`` with the classes in the last
            dimension, ``"gaussian"``, ``"bernoulli"``), needed by ``fisher="type-2"`` and
            ``"mc"``; the loss must be a sum of the positions' NLLs with weights that do
            not depend on the targets (a mean over counted tokens, say).

    Attributes:
        blocks: one :class:`KroneckerBlock` per layer, in the order of the flat vector:
            the factors ``A`` and ``G``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randn(8, 2))
        >>> K = KFACOperator(model, torch.nn.MSELoss(), data)
        >>> K.shape, [tuple(b.A.shape) for b in K.blocks], [tuple(b.G.shape) for b in K.blocks]
        ((26, 26), [(4, 4), (5, 5)], [(4, 4), (2, 2)])
        >>> v = torch.randn(26)
        >>> torch.allclose(K.inverse(damping=0.1) @ (K @ v + 0.1 * v), v, atol=1e-4)
        True
    """

    symmetric = True
    psd = True
    _empty_ok = False  # a data-parallel rank may hold no batch; the others carry it
    _factors_now = True  # a data-parallel operator computes them after its ranks agree

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        params=None,
        *,
        fisher: str = "type-2",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        weight_sharing: str = "expand",
        likelihood: str | None = None,
        io=None,
    ):
        self.fisher = check_choice(fisher, "fisher", FISHER_TYPES)
        self.weight_sharing = check_choice(weight_sharing, "weight_sharing", WEIGHT_SHARING)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if mc_samples != 1 and fisher != "mc":
            raise ValueError(f"mc_samples applies to fisher='mc' only, got fisher={fisher!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.mc_samples = mc_samples
        self.fn = ModelLoss(model, loss_fn, params, io, second_order=False)
        super().__init__(self.fn.size, self.fn.space.dtype, self.fn.space.device)
        self.curvature = OutputCurvature(loss_fn, likelihood)
        self.reduction = self.curvature.reduction
        generic = self.curvature.kind == "generic"
        if fisher == "type-2" and generic and self.curvature.likelihood is None:
            raise ValueError(
                "fisher='type-2' needs the output Hessian's square root: it is known for "
                "MSELoss, CrossEntropyLoss and BCEWithLogitsLoss, and for a loss written as "
                "a function that names its likelihood= ('categorical', 'gaussian', "
                "'bernoulli'); or use fisher='empirical'"
            )
        if fisher == "mc":
            self.curvature.check_fisher("mc")
        self.data = _check_data(data, self._empty_ok, io=self.fn.io)
        self._layers = _layers(self.fn)
        gen_device = generator.device if generator is not None else "cpu"
        self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        self.chunk_size = max(self.shape[0], 1)
        self.blocks: list[KroneckerBlock] = []
        if self._factors_now:
            self.update()

    @property
    def model(self) -> nn.Module:
        return self.fn.model

    @property
    def space(self):
        return self.fn.space

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}``."""
        return {b.module: (b.A, b.G) for b in self.blocks}

    # -- the pass over the data -------------------------------------------------------------
    def _columns(self, out: Tensor, targets: Any, index: int) -> Tensor:
        """The columns ``(K, *out.shape)`` to backpropagate for one batch."""
        if self.fisher == "type-2":
            return _hessian_sqrt(self.curvature, out, targets)
        gen = None
        if self.fisher == "mc":
            gen = torch.Generator(device=out.device)
            gen.manual_seed(self._seed + index)
        S, c = self.curvature.fisher_factors(
            out.detach(), targets, self.fisher, gen, self.mc_samples
        )
        scale = (c / S.shape[0]).sqrt().reshape(1, -1, *[1] * (out.dim() - 1))
        return S * scale

    def _batches(self) -> Iterator[tuple[float, list[tuple[Tensor, Tensor]]]]:
        """For each batch with samples: its weight and, per layer, the inputs ``(N, R, d)``
        (patches for a convolution, a one appended for a bias; ones for a bias alone) and
        the backpropagated columns ``(K, N, R, out)``."""
        params = self.fn.params()
        losses, found = [], False
        _start_pass(self.data)
        for index, batch in enumerate(self.data):
            weight = self.fn.weight(batch)
            if weight == 0:
                continue
            found = True
            report("batch")
            inputs, targets = self.fn.split(batch)
            seen: dict[str, tuple[Tensor, Tensor]] = {}
            handles = [
                la.module.register_forward_hook(partial(_record, seen=seen, name=la.name))
                for la in self._layers
            ]
            try:
                with torch.enable_grad():
                    out = self.fn.outputs(params, inputs)
            finally:
                for h in handles:
                    h.remove()
            missing = [la.name for la in self._layers if la.name not in seen]
            if missing:
                raise ValueError(
                    f"layer(s) {missing} hold selected parameters but did not run in the "
                    "forward pass; select the others with params="
                )
            self.curvature.check_targets(out, targets)
            with torch.no_grad():
                losses.append(self.fn.loss_fn(out.detach(), targets).detach())
            cols = self._columns(out, targets, index)
            probes = [seen[la.name][1] for la in self._layers]
            grads = [[] for _ in probes]
            for k in range(cols.shape[0]):
                gk = torch.autograd.grad(
                    out, probes, cols[k], retain_graph=k < cols.shape[0] - 1, allow_unused=True
                )
                for j, g in enumerate(gk):
                    grads[j].append(torch.zeros_like(probes[j]) if g is None else g)
            per_layer = []
            for la, gs in zip(self._layers, grads):
                x = seen[la.name][0]
                per_layer.append((self._inputs(la, x), _output_rows(la.module, torch.stack(gs))))
            yield weight, per_layer
        if not found and not self._empty_ok:
            raise ValueError("data is empty: expected at least one batch (inputs, targets)")
        if losses and not all_finite(*losses):
            for loss in losses:
                check_finite(loss, NONFINITE_LOSS)

    def _inputs(self, la: _Layer, x: Tensor) -> Tensor:
        """The layer's input as rows ``(N, R, d)``, extended as its block needs."""
        if la.weight is None:
            n, r = _positions(la.module, x)
            return x.new_ones(n, r, 1)
        rows = _input_rows(la.module, x)
        if la.bias is not None:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def _factor_sums(self, per_batch) -> tuple[list[Tensor], list[Tensor], int, float]:
        """Each layer's sums over the data of the input terms and of the (weighted)
        gradient terms, the number of samples and the batches' total weight: what the
        data-parallel operator adds up over ranks."""
        mean = self.reduction == "mean"
        expand = self.weight_sharing == "expand"
        kw = dict(dtype=self.dtype, device=self.device)
        A_sum = [torch.zeros(la.d, la.d, **kw) for la in self._layers]
        G_sum = [torch.zeros(la.out, la.out, **kw) for la in self._layers]
        count, total = 0, 0.0
        for weight, per_layer in per_batch:
            w = weight if mean else 1.0
            for j, (x, g) in enumerate(per_layer):
                a, gg = batch_factors(x, g, expand)
                A_sum[j].add_(a)
                G_sum[j].add_(gg, alpha=w)
            count += per_layer[0][0].shape[0]
            total += weight
        return A_sum, G_sum, count, total

    def _accumulate(self, per_batch) -> tuple[list[Tensor], list[Tensor]]:
        """The factors ``A`` and ``G`` of every layer over the data."""
        A_sum, G_sum, count, total = self._factor_sums(per_batch)
        A = [a / count for a in A_sum]
        G = [g / total for g in G_sum] if self.reduction == "mean" else G_sum
        return A, G

    def update(self) -> None:
        """Compute the factors again, at the current parameters (one pass over the data);
        cached eigendecompositions are dropped."""
        A, G = self._accumulate(self._batches())
        names = self.fn.names
        self.blocks = []
        for la, a, g in zip(self._layers, A, G):
            ps = tuple(names[i] for i in sorted(i for i in (la.weight, la.bias) if i is not None))
            check_finite(a, f"the input factor A of layer {la.name!r}")
            check_finite(g, f"the gradient factor G of layer {la.name!r}")
            self.blocks.append(KroneckerBlock(la.name, ps, a, g))

    # -- products ---------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        return _apply(self, V, lambda j, M: self.blocks[j].G @ M @ self.blocks[j].A)

    # -- what Kronecker structure gives cheaply -------------------------------------------
    def _spectra(self) -> list[Tensor]:
        """Each block's eigenvalues as an ``(out, d)`` grid."""
        out = []
        for b in self.blocks:
            la, _, lg, _ = b.eigh()
            out.append(lg[:, None] * la[None, :])
        return out

    def trace(self) -> Tensor:
        r""":math:`\sum_\ell \operatorname{tr}(A_\ell)\operatorname{tr}(G_\ell)`."""
        return sum(b.A.trace() * b.G.trace() for b in self.blocks)

    def frobenius_norm(self) -> Tensor:
        r""":math:`(\sum_\ell \|A_\ell\|_F^2 \|G_\ell\|_F^2)^{1/2}`."""
        return torch.sqrt(sum(b.A.square().sum() * b.G.square().sum() for b in self.blocks))

    def logdet(self, damping: float = 0.0) -> Tensor:
        r""":math:`\log\det(K + \lambda I) = \sum_\ell \sum_{ij} \log(g_i a_j + \lambda)`
        from the factors' eigenvalues (``-inf`` for a singular ``K`` without damping)."""
        damping = _check_damping(damping, allow_zero=True)
        return sum(torch.log(s + damping).sum() for s in self._spectra())

    def inverse(self, damping: float, *, method: str = "exact") -> CurvatureOperator:
        r"""The damped inverse as an operator.

        ``method="exact"``: :math:`(G \otimes A + \lambda I)^{-1} = (Q_G \otimes Q_A)
        (\Lambda_G \otimes \Lambda_A + \lambda)^{-1} (Q_G \otimes Q_A)^\top` per block,
        from the factors' eigendecompositions (cached). ``method="pi"``: Martens & Grosse's
        factored damping :math:`(G + \frac{\sqrt\lambda}{\pi} I)^{-1} \otimes (A +
        \pi\sqrt\lambda I)^{-1}` with :math:`\pi = \sqrt{(\operatorname{tr}A / \dim A) /
        (\operatorname{tr}G / \dim G)}`, an approximation of the former.
        """
        check_choice(method, "method", DAMPING_METHODS)
        damping = _check_damping(damping)
        diags = [
            1.0 / damped_spectrum(b.eigh()[0], b.eigh()[2], damping, method) for b in self.blocks
        ]
        return _EigenKronecker(self, diags)


def batch_factors(x: Tensor, g: Tensor, expand: bool) -> tuple[Tensor, Tensor]:
    r"""One batch's contributions to the factors from inputs ``x`` ``(N, R, d)`` and
    backpropagated columns ``g`` ``(K, N, R, out)``: :math:`\sum_i` of the samples'
    input terms (``A`` is their mean over all samples) and :math:`\sum_{i,k}` of the
    gradient terms (expand: per position; reduce: mean inputs, summed gradients)."""
    if expand:
        a = torch.einsum("nri,nrj->ij", x, x) / x.shape[1]
        return a, torch.einsum("knri,knrj->ij", g, g)
    xm, gs = x.mean(1), g.sum(2)
    return xm.T @ xm, torch.einsum("kni,knj->ij", gs, gs)


def damped_spectrum(la: Tensor, lg: Tensor, damping: float, method: str) -> Tensor:
    r"""The eigenvalues ``(out, d)`` of a damped block from the factors' eigenvalues:
    :math:`g_i a_j + \lambda` (``"exact"``) or :math:`(g_i + \sqrt\lambda / \pi)(a_j +
    \pi \sqrt\lambda)` (``"pi"``, :math:`\pi^2` the ratio of the factors' mean
    eigenvalues, :math:`\operatorname{tr} A / \dim A` over :math:`\operatorname{tr} G /
    \dim G`)."""
    if method == "exact":
        return lg[:, None] * la[None, :] + damping
    ta, tg = float(la.mean()), float(lg.mean())
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    root = math.sqrt(damping)
    return (lg[:, None] + root / pi) * (la[None, :] + root * pi)


def _check_damping(damping: object, allow_zero: bool = False) -> float:
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool)
    ok = ok and math.isfinite(damping) and (damping >= 0 if allow_zero else damping > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"damping must be a finite number {bound}, got {damping!r}")
    return float(damping)


def _record(module: nn.Module, args: tuple, output: Tensor, *, seen: dict, name: str) -> Tensor:
    """Forward hook: keep the layer's input, and add a zero probe to its output whose
    gradient is the gradient with respect to the output (the parameters themselves need no
    gradient; an in-place op after the layer leaves the probe alone)."""
    if name in seen:
        raise ValueError(
            f"layer {name!r} runs more than once in one forward pass; KFAC needs one call "
            "per layer (select the others with params=)"
        )
    probe = torch.zeros_like(output, requires_grad=True)
    seen[name] = (args[0].detach(), probe)
    return output + probe


def _positions(module: nn.Module, x: Tensor) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise ValueError(f"KFAC needs batched Conv2d inputs (N, C, H, W), got {tuple(x.shape)}")
        return x.shape[0], -1
    if x.dim() < 2:
        raise ValueError(f"KFAC needs batched Linear inputs (N, ..., d), got {tuple(x.shape)}")
    return x.shape[0], math.prod(x.shape[1:-1])


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A Linear's input as ``(N, R, d_in)``; a Conv2d's patches as ``(N, L, C k1 k2)``."""
    if isinstance(module, nn.Conv2d):
        _positions(module, x)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.transpose(1, 2)
    n, r = _positions(module, x)
    return x.reshape(n, r, x.shape[-1])


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Gradients ``(K, N, ...)`` with respect to a layer's output as ``(K, N, R, out)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _apply(op, V: Tensor, block_mm) -> Tensor:
    """Apply ``block_mm(j, M)`` to each block's columns ``M`` of shape ``(k, out, d)``."""
    cols = op.space.unflatten_columns(V)
    k = V.shape[1]
    result: list[Tensor | None] = [None] * len(cols)
    for j, la in enumerate(op._layers):
        parts = []
        if la.weight is not None:
            parts.append(cols[la.weight].reshape(k, la.out, la.d_w))
        if la.bias is not None:
            parts.append(cols[la.bias].reshape(k, la.out, 1))
        M = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        R = block_mm(j, M)
        if la.weight is not None:
            result[la.weight] = R[..., : la.d_w]
        if la.bias is not None:
            result[la.bias] = R[..., la.d_w]
    return op.space.flatten_columns(result)


class _EigenKronecker(CurvatureOperator):
    r"""Block diagonal :math:`(Q_G \otimes Q_A) \operatorname{diag}(D) (Q_G \otimes
    Q_A)^\top` over the layers of a Kronecker-factored operator: the damped inverses of
    KFAC and EKFAC."""

    symmetric = True

    def __init__(self, op: KFACOperator, diags: list[Tensor]):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.space, self._layers = op.space, op._layers
        self._bases = [(b.eigh()[1], b.eigh()[3]) for b in op.blocks]
        self.diags = diags
        self.psd = all(bool((d >= 0).all()) for d in diags)
        self.chunk_size = op.chunk_size

    def _matmat(self, V: Tensor) -> Tensor:
        return _apply(self, V, self._block)

    def _block(self, j: int, M: Tensor) -> Tensor:
        qa, qg = self._bases[j]
        return qg @ (self.diags[j] * (qg.T @ M @ qa)) @ qa.T
