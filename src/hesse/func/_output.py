r"""The loss as a function of the model's outputs: its Hessian and its Fisher factors.

**Output Hessians.** Closed forms for ``MSELoss`` (:math:`2c\,I`), ``BCEWithLogitsLoss``
(:math:`c\,w\,(y\,p_w + 1 - y)\,\sigma(1-\sigma)` elementwise) and ``CrossEntropyLoss`` on
logits of any shape :math:`(N, C, d_1, \dots, d_k)`, with class-index targets
:math:`(N, d_1, \dots, d_k)` or probability targets shaped like the logits. Every position
of a cross-entropy loss is :math:`-\sum_c \beta_c \log p_c` with :math:`p` the softmax over
the class dimension, whose Hessian is :math:`(\sum_c \beta_c)(\operatorname{diag} p - p
p^\top)`; so the output Hessian is block diagonal over positions with blocks

.. math:: H_{pos} = a_{pos}\,(\operatorname{diag} p_{pos} - p_{pos} p_{pos}^\top), \qquad
    a_{pos} = \frac{[y \ne \text{ignore}]\,\big((1-\varepsilon)\,w_y
    + \tfrac{\varepsilon}{C}\textstyle\sum_c w_c\big)}{\sum_{pos'} [y' \ne \text{ignore}]\,w_{y'}}

for class indices (weights :math:`w`, label smoothing :math:`\varepsilon`; ``reduction="sum"``
drops the denominator) and :math:`a = \sum_c w_c q'_c / (N d_1 \cdots d_k)` with
:math:`q' = (1-\varepsilon) q + \varepsilon / C` for probability targets :math:`q`. Any other
loss gets its output Hessian from autograd.

**Fisher factors.** A loss is :math:`\sum_i c_i \mathrm{NLL}_i` over the samples :math:`i`
(the leading dimension) of a likelihood, and

.. math:: F = \sum_i c_i\, J_i^\top \Big(\tfrac{1}{M}\sum_m s_{im} s_{im}^\top\Big) J_i

with :math:`s_{im} = \nabla_{o_i}\mathrm{NLL}_i(o_i, y)` at the true target (empirical
Fisher, ``M = 1``; the block of sample :math:`i` is :math:`g_i g_i^\top / c_i` with
:math:`g_i = \nabla_{o_i} \ell`) or at targets :math:`\hat y` drawn from the model's
predictive distribution (Monte-Carlo Fisher). :math:`\mathrm{NLL}_i` sums over the
sample's positions: :math:`c_i = 1/N_{tok}` for a loss averaged over :math:`N_{tok}` counted
tokens or entries (``MSELoss``, ``BCEWithLogitsLoss``, a sequence cross-entropy), so the
Fisher of several batches, each weighted by its :func:`loss_normalizer`, is the Fisher of
the loss over all of them. Positions are independent given the outputs and
:math:`\mathbb{E}[s_{pos}] = 0`, so :math:`\mathbb{E}_{\hat y}[c_i\, s_i s_i^\top]` is block
diagonal with blocks :math:`a_{pos}\,\mathrm{Cov}(s_{pos}) = H_{pos}`: the MC Fisher is an
unbiased estimate of the GGN. Where :math:`a_{pos}` varies within a sample, the factors
carry :math:`\sqrt{a_{pos}/c_i}`.

**Named likelihoods.** A loss written as a function names its likelihood with
``likelihood=``: ``"categorical"`` (logits with the classes in the *last* dimension,
class-index targets; positions whose target is not in :math:`[0, C)` are ignored),
``"gaussian"`` (NLL :math:`\|o - y\|^2`, variance 1/2) or ``"bernoulli"`` (logits). The MC
Fisher then draws :math:`\hat y`, computes :math:`g = \nabla_o \ell(o, \hat y)` by autograd,
and recovers each position's scale from :math:`g_{pos} = a_{pos}\, s_{pos}` as
:math:`a_{pos} = \langle g_{pos}, s_{pos}\rangle / \langle s_{pos}, s_{pos}\rangle`
(:math:`s = p - e_{\hat y}`, :math:`\sigma(o) - \hat y`, :math:`2(o - \hat y)`), checking the
residual; this holds for any loss :math:`\sum_{pos} a_{pos} \mathrm{NLL}_{pos}` whose
scales do not depend on the targets (a mean over the counted tokens, a sum, fixed weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn import functional as F

FISHER_KINDS = ("empirical", "mc")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")

_KIND_LIKELIHOOD = {"mse": "gaussian", "cross_entropy": "categorical", "bce_logits": "bernoulli"}
# Losses whose mean is over every element of the (broadcast) outputs and targets.
_ELEMENTWISE_MEAN = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
    nn.KLDivLoss,
)


def _reduction(loss_fn: object) -> str:
    return getattr(loss_fn, "reduction", "mean")


def _valid_classes(targets: Any, out_shape: torch.Size, class_dim: int, what: str) -> Tensor:
    """``targets`` in ``[0, C)`` for class-index targets of outputs ``out_shape``."""
    pos_shape = list(out_shape)
    num_classes = pos_shape.pop(class_dim)
    if (
        not isinstance(targets, Tensor)
        or targets.dtype != torch.long
        or list(targets.shape) != pos_shape
    ):
        got = (
            f"{targets.dtype} targets of shape {tuple(targets.shape)}"
            if isinstance(targets, Tensor)
            else type(targets).__name__
        )
        raise ValueError(
            f"{what} needs class-index (long) targets of shape {tuple(pos_shape)} for outputs "
            f"of shape {tuple(out_shape)} (classes in dim {class_dim}); got {got}"
        )
    return (targets >= 0) & (targets < num_classes)


def _check_labels(targets: Tensor, num_classes: int | None, ignore_index: int) -> None:
    """Raise a ``ValueError`` unless every class-index target is in ``[0, num_classes)`` or
    is ``ignore_index`` (only ``>= 0`` when ``num_classes`` is unknown). One host sync: a
    label out of range would otherwise be clamped or indexed silently (``CrossEntropyLoss``
    itself raises)."""
    bad = targets != ignore_index
    bad &= targets < 0 if num_classes is None else (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        labels = torch.unique(targets[bad])
        shown = ", ".join(str(v) for v in labels[:10].tolist())
        more = f" (and {labels.numel() - 10} more)" if labels.numel() > 10 else ""
        classes = "" if num_classes is None else f" for {num_classes} classes"
        upper = "C" if num_classes is None else str(num_classes)
        raise ValueError(
            f"cross-entropy targets must be class indices in [0, {upper}) or ignore_index="
            f"{ignore_index}; got label(s) {shown}{more}{classes} "
            f"({int(bad.sum())} of {targets.numel()} targets)"
        )


class OutputCurvature:
    """Curvature of ``loss_fn(outputs, targets)`` with respect to ``outputs``.

    Args:
        loss_fn: the loss; closed forms are used for :class:`torch.nn.MSELoss`,
            :class:`torch.nn.CrossEntropyLoss` (logits ``(N, C, d1, ...)``) and
            :class:`torch.nn.BCEWithLogitsLoss`, autograd otherwise.
        likelihood: the likelihood whose NLL the loss is, needed by the Monte-Carlo Fisher
            of a loss written as a function: ``"categorical"`` (classes in the last
            dimension of the outputs, class-index targets; targets outside ``[0, C)`` are
            ignored), ``"gaussian"`` or ``"bernoulli"`` (on logits). For the three losses
            above it is known, and a different one is an error.

    Example:
        >>> curv = OutputCurvature(lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()),
        ...                        likelihood="categorical")
        >>> curv.normalizer(torch.tensor([[0, 2, -100]]))
        2.0
    """

    def __init__(self, loss_fn: Callable[[Tensor, Any], Tensor], likelihood: str | None = None):
        self.loss_fn = loss_fn
        self.reduction = _reduction(loss_fn)
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"the loss must reduce to a scalar with reduction 'mean' or 'sum', "
                f"got reduction={self.reduction!r}"
            )
        if isinstance(loss_fn, nn.MSELoss):
            self.kind = "mse"
        elif isinstance(loss_fn, nn.CrossEntropyLoss):
            self.kind = "cross_entropy"
        elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
            self.kind = "bce_logits"
        else:
            self.kind = "generic"
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be None or one of {LIKELIHOODS}, got {likelihood!r}")
        known = _KIND_LIKELIHOOD.get(self.kind)
        if likelihood is not None and known is not None and likelihood != known:
            raise ValueError(
                f"loss_fn is a {type(loss_fn).__name__}, whose likelihood is {known!r}; "
                f"got likelihood={likelihood!r}"
            )
        if likelihood is not None and isinstance(loss_fn, nn.NLLLoss):
            raise ValueError(
                "likelihood= is not supported for NLLLoss (it takes log-probabilities, not "
                "logits): use CrossEntropyLoss on the logits"
            )
        self.likelihood = likelihood or known
        #: The class dimension of the outputs for a categorical likelihood.
        self.class_dim = 1 if self.kind == "cross_entropy" else -1
        self._checked: tuple[Tensor, int] | None = None  # see check_targets

    def check_targets(self, out: Tensor, targets: Any) -> None:
        """Raise a ``ValueError`` if class-index targets of a ``CrossEntropyLoss`` lie
        outside ``[0, C)`` (``C = out.shape[1]``) and are not its ``ignore_index``.

        The closed forms below call it; a caller that evaluates the loss itself on a batch
        first should call it before, since ``CrossEntropyLoss`` on CUDA fails on such a
        label with a device-side assert. The targets last checked are remembered (by
        identity and version), so checking them again costs no second host sync.
        """
        if not (self.kind == "cross_entropy" and self._closed_form(out, targets)):
            return
        if targets.dtype != torch.long:
            return
        last = self._checked
        if last is not None and last[0] is targets and last[1] == targets._version:
            return
        _check_labels(targets, out.shape[1], self.loss_fn.ignore_index)
        self._checked = (targets, targets._version)

    def check_fisher(self, kind: str) -> None:
        """Raise a ``ValueError`` if the Fisher of this ``kind`` cannot be formed."""
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
        if kind == "mc" and self.likelihood is None:
            raise ValueError(
                "kind='mc' needs the likelihood behind the loss; it is known for MSELoss, "
                "CrossEntropyLoss and BCEWithLogitsLoss, and for a loss written as a function "
                f"({type(self.loss_fn).__name__} here) pass likelihood='categorical' "
                "(classes in the last dim), 'gaussian' or 'bernoulli'; or use "
                "kind='empirical' or the GGN"
            )

    # -- the normaliser of a mean loss ---------------------------------------------------
    def normalizer(self, targets: Any, out_shape: tuple[int, ...] | None = None) -> float | None:
        """What the loss's mean divides by for these targets (see :func:`loss_normalizer`)."""
        if self.reduction == "sum" or not isinstance(targets, Tensor):
            return None
        lf = self.loss_fn
        if isinstance(lf, (nn.CrossEntropyLoss, nn.NLLLoss)):
            if targets.is_floating_point():  # probabilities (N, C, d...): a mean over positions
                return float(targets.numel() // targets.shape[1]) if targets.dim() > 1 else 1.0
            n_cls = out_shape[1] if out_shape is not None and len(out_shape) > 1 else None
            if n_cls is None and lf.weight is not None:
                n_cls = lf.weight.numel()
            _check_labels(targets, n_cls, lf.ignore_index)
            valid = targets != lf.ignore_index
            if lf.weight is None:
                return float(valid.sum())
            # the clamp only reaches ignored positions (checked above), which valid zeroes
            w = lf.weight[targets.clamp(0, lf.weight.numel() - 1)]
            return float((w * valid).sum())
        if isinstance(lf, _ELEMENTWISE_MEAN) or self.likelihood in ("gaussian", "bernoulli"):
            shape = targets.shape
            if out_shape is not None:
                shape = torch.broadcast_shapes(tuple(out_shape), shape)
            return float(math.prod(shape))
        if self.likelihood == "categorical":
            valid = targets >= 0
            if out_shape is not None:
                valid &= targets < out_shape[self.class_dim]
            return float(valid.sum())
        return None

    # -- which cases have closed forms ---------------------------------------------------
    def _closed_form(self, out: Tensor, targets: Any) -> bool:
        if not isinstance(targets, Tensor):
            return False
        if self.kind == "mse":
            return targets.shape == out.shape
        if self.kind == "cross_entropy":
            if out.dim() < 2:
                return False
            if targets.dtype == torch.long:
                return targets.shape == out.shape[:1] + out.shape[2:]
            return targets.shape == out.shape and targets.is_floating_point()
        if self.kind == "bce_logits":
            return targets.shape == out.shape
        return False

    def _ce_scales(self, out: Tensor, targets: Tensor, hessian: bool) -> Tensor:
        r"""Per-position scales of a cross-entropy loss, shaped ``(N, 1, d1, ...)``: the
        factors :math:`a_{pos}` of the output Hessian (``hessian=True``, see the module),
        or the NLL scales :math:`c_{pos}` of ``loss = sum c_pos NLL_pos`` with
        :math:`\mathrm{NLL}_{pos}` the unweighted NLL at a class-index target, the weighted
        one for probabilities."""
        lf, n_cls = self.loss_fn, out.shape[1]
        eps = lf.label_smoothing
        w = None if lf.weight is None else lf.weight.to(out.dtype)
        if targets.dtype == torch.long:
            self.check_targets(out, targets)
            valid = (targets != lf.ignore_index).to(out.dtype)
            # the clamp only reaches ignored positions (checked above), which valid zeroes
            wy = valid if w is None else w[targets.clamp(0, n_cls - 1)] * valid
            a = wy
            if hessian and eps:
                total = float(n_cls) if w is None else w.sum()
                a = valid * ((1 - eps) * wy + eps / n_cls * total)
            if self.reduction == "mean":
                a = a / wy.sum().clamp_min(torch.finfo(out.dtype).tiny)
            return a.unsqueeze(1)
        if hessian:
            q = targets.to(out.dtype)
            if eps:
                q = (1 - eps) * q + eps / n_cls
            a = (q.sum(1) if w is None else torch.einsum("nc...,c->n...", q, w)).unsqueeze(1)
        else:
            a = torch.ones_like(out[:, :1])
        return a / (targets.numel() // n_cls) if self.reduction == "mean" else a

    def _bce_scales(self, out: Tensor, targets: Tensor, hessian: bool) -> Tensor:
        r"""Elementwise scales of ``BCEWithLogitsLoss``: of the output Hessian
        :math:`w (p_w y + 1 - y) / \text{numel}` or of the NLL, :math:`1/\text{numel}`."""
        lf = self.loss_fn
        a = torch.ones_like(out)
        if hessian:
            if lf.weight is not None:
                a = a * lf.weight.to(out.dtype)
            if lf.pos_weight is not None:
                y = targets.to(out.dtype)
                a = a * (lf.pos_weight.to(out.dtype) * y + 1 - y)
        return a / out.numel() if self.reduction == "mean" else a

    # -- Hessian with respect to the outputs ---------------------------------------------
    def hessian_mm(self, out: Tensor, targets: Any, U: Tensor) -> Tensor:
        """``H_out @ u`` for each ``u`` in ``U`` of shape ``(k, *out.shape)``."""
        out = out.detach()
        if self._closed_form(out, targets):
            if self.kind == "mse":
                return (2.0 / out.numel() if self.reduction == "mean" else 2.0) * U
            if self.kind == "bce_logits":
                s = torch.sigmoid(out)
                return self._bce_scales(out, targets, True) * s * (1 - s) * U
            p = torch.softmax(out, dim=1)
            a = self._ce_scales(out, targets, hessian=True)
            return a * p * (U - (p * U).sum(2, keepdim=True))
        return self._autograd_hessian_mm(out, targets, U)

    def _autograd_hessian_mm(self, out: Tensor, targets: Any, U: Tensor) -> Tensor:
        def loss_of_out(o: Tensor) -> Tensor:
            return self.loss_fn(o, targets)

        with torch.enable_grad():
            _, vjp_fn = vjp(grad(loss_of_out), out)
            return vmap(vjp_fn)(U)[0]

    # -- Fisher factors -------------------------------------------------------------------
    def fisher_factors(
        self,
        out: Tensor,
        targets: Any,
        kind: str,
        generator: torch.Generator | None = None,
        mc_samples: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(S, c)``: factors ``S`` of shape ``(M, *out.shape)`` and per-sample
        scales ``c`` of shape ``(N,)`` so that the output-space Fisher block of sample ``i``
        is ``c_i / M * sum_m S[m, i] S[m, i]^T``."""
        self.check_fisher(kind)
        out = out.detach()
        if kind == "empirical":
            c = self._fold(self._nll_scales(out, targets))
            g = _loss_gradient(self.loss_fn, out, targets)
            # s_i = g_i / c_i, the gradient of sample i's NLL; samples with c_i = 0 add nothing.
            safe = torch.where(c == 0, torch.ones_like(c), c)
            return (g / safe.reshape(-1, *[1] * (out.dim() - 1))).unsqueeze(0), c
        if self._closed_form(out, targets) or self.kind == "mse":
            s = self._draw(out, mc_samples, generator)[0]
            if self.kind == "cross_entropy":
                a = self._ce_scales(out, targets, hessian=True)
            elif self.kind == "bce_logits":
                a = self._bce_scales(out, targets, hessian=True)
            else:
                a = torch.full_like(out, 1.0 / out.numel() if self.reduction == "mean" else 1.0)
            return self._factors(s, a.unsqueeze(0))
        if self.kind == "cross_entropy":
            raise ValueError(
                "kind='mc' with CrossEntropyLoss needs logits (N, C, d1, ...) and class-index "
                "targets (N, d1, ...) or probabilities shaped like the logits; got outputs "
                f"{tuple(out.shape)} and targets {getattr(targets, 'shape', type(targets))}"
            )
        return self._recovered_factors(out, targets, mc_samples, generator)

    def _draw(
        self, out: Tensor, m: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``m`` draws from the predictive distribution at ``out``: the NLL gradients ``s``
        at the draws and the draws ``y`` (class indices for a categorical), each ``(m, ...)``."""
        if self.likelihood == "gaussian":  # y ~ N(o, 1/2): s = 2 (o - y) = -sqrt(2) z
            z = torch.randn(
                (m, *out.shape), generator=generator, dtype=out.dtype, device=out.device
            )
            return -(2.0**0.5) * z, out + z * 0.5**0.5
        if self.likelihood == "bernoulli":
            p = torch.sigmoid(out).expand(m, *out.shape)
            y = torch.bernoulli(p, generator=generator)
            return p - y, y
        cd = self.class_dim % out.dim()
        p = torch.softmax(out, dim=cd)
        p_last = p.movedim(cd, -1)
        idx = torch.multinomial(p_last.reshape(-1, p.shape[cd]), m, True, generator=generator)
        y = idx.T.reshape(m, *p_last.shape[:-1])  # (m, N, d1, ...)
        onehot = F.one_hot(y, p.shape[cd]).to(out.dtype).movedim(-1, cd + 1)
        return p.unsqueeze(0) - onehot, y

    def _recovered_factors(
        self, out: Tensor, targets: Any, m: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """MC factors of a loss with a named likelihood but no closed form: per-position
        scales recovered from the loss's gradient at the draws (see the module)."""
        s, y = self._draw(out, m, generator)
        categorical = self.likelihood == "categorical"
        if categorical:
            cd = self.class_dim % out.dim()
            valid = _valid_classes(targets, out.shape, cd, "likelihood='categorical'")
            y = torch.where(valid, y, targets)  # the loss ignores what the user's targets do
        elif isinstance(targets, Tensor) and targets.is_floating_point():
            y = y.to(targets.dtype)
        g = self._draw_gradients(out, y)
        if categorical:
            gss, sss = (g * s).sum(cd + 1, keepdim=True), (s * s).sum(cd + 1, keepdim=True)
        else:
            gss, sss = g * s, s * s
        a = torch.where(sss > 0, gss / torch.where(sss > 0, sss, 1), 0)
        resid, scale = (g - a * s).norm(), g.norm()
        tol = max(1e-3, 30 * torch.finfo(out.dtype).eps)
        if resid > tol * scale:
            where = f"classes in dim {self.class_dim}, " if categorical else ""
            raise ValueError(
                f"loss_fn's gradient is not a per-position multiple of the {self.likelihood} "
                f"NLL's gradient (relative residual {float(resid / scale):.2g}): "
                f"likelihood={self.likelihood!r} needs loss_fn(o, y) = sum_pos a_pos "
                f"NLL(o_pos, y_pos) ({where}no label smoothing)"
            )
        if (a < 0).any():
            raise ValueError(
                "loss_fn weighs some positions negatively: it is not a likelihood's NLL and "
                "its Fisher is not defined"
            )
        return self._factors(s, a)

    def _draw_gradients(self, out: Tensor, y: Tensor) -> Tensor:
        """``grad_o loss_fn(o, y[m])`` for each draw. Plain autograd, one draw at a time
        (``mc_samples`` is small): unlike :mod:`torch.func`'s transforms it runs where
        saved-tensor hooks are active (a linearised operator measures its graphs so)."""
        return torch.stack([_loss_gradient(self.loss_fn, out, ym) for ym in y])

    def _factors(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Fold per-position scales ``a`` (broadcastable to ``s``, of shape ``(1 or M, N, ...)``)
        into per-sample ``c_i`` (the mean of the non-zero scales of sample ``i``) and factors
        ``S = s sqrt(a / c_i)``, so that ``c_i S S^T = a s s^T`` position by position."""
        c = self._fold(a.movedim(0, 1))
        safe = torch.where(c > 0, c, 1).reshape(1, -1, *[1] * (a.dim() - 2))
        return s * (a / safe).sqrt(), c

    @staticmethod
    def _fold(a: Tensor) -> Tensor:
        """Per-sample mean of the non-zero entries of ``a`` of shape ``(N, ...)``."""
        flat = a.reshape(a.shape[0], -1)
        return flat.sum(1) / (flat != 0).sum(1).clamp_min(1)

    def _nll_scales(self, out: Tensor, targets: Any) -> Tensor:
        """Scales ``c_pos`` of ``loss = sum c_pos NLL_pos``, shaped ``(N, ...)``."""
        n = out.shape[0]
        mean = self.reduction == "mean"
        if self.kind == "cross_entropy" and self._closed_form(out, targets):
            return self._ce_scales(out, targets, hessian=False)
        if self.kind in ("mse", "bce_logits") or self.likelihood in ("gaussian", "bernoulli"):
            c = 1.0 / out.numel() if mean else 1.0
            return torch.full((n, 1), c, dtype=out.dtype, device=out.device)
        if self.likelihood == "categorical":
            cd = self.class_dim % out.dim()
            valid = _valid_classes(targets, out.shape, cd, "likelihood='categorical'")
            a = valid.to(out.dtype)
            return a / a.sum().clamp_min(torch.finfo(out.dtype).tiny) if mean else a
        return torch.full((n, 1), 1.0 / n if mean else 1.0, dtype=out.dtype, device=out.device)


def _loss_gradient(loss_fn: Callable[[Tensor, Any], Tensor], out: Tensor, targets: Any) -> Tensor:
    """``grad_o loss_fn(o, targets)`` at ``o = out``, by plain autograd."""
    with torch.enable_grad():
        o = out.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(o, targets), o, allow_unused=True)
    return torch.zeros_like(out) if g is None else g


def fisher_mm(S: Tensor, c: Tensor, U: Tensor) -> Tensor:
    """Apply the output-space Fisher of factors ``(S, c)`` to ``U`` of shape ``(k, *out)``."""
    m, n = S.shape[0], S.shape[1]
    k = U.shape[0]
    Sf = S.reshape(m, n, -1)
    coeff = torch.einsum("mnd,knd->kmn", Sf, U.reshape(k, n, -1)) * (c / m)
    return torch.einsum("kmn,mnd->knd", coeff, Sf).reshape(U.shape)


def loss_normalizer(
    loss_fn: Callable[[Tensor, Any], Tensor],
    out_shape: tuple[int, ...] | None,
    targets: Any,
    likelihood: str | None = None,
) -> float | None:
    r"""The number a mean loss divides its sum by, for a batch with these targets.

    A data loop that weights batch :math:`b`'s curvature :math:`C_b` (of its mean loss) by
    :math:`w_b` and returns :math:`\sum_b w_b C_b / \sum_b w_b` gets the curvature of the
    loss averaged over every counted token of all batches: the loss over the concatenation
    is :math:`\sum_b w_b \ell_b / \sum_b w_b`.

    * ``CrossEntropyLoss`` / ``NLLLoss`` with class indices: the number of targets other
      than ``ignore_index``, or the sum of ``weight[target]`` over them with class weights;
      with probability targets, the number of positions ``N d1 ... dk``.
    * Elementwise means (``MSELoss``, ``BCEWithLogitsLoss``, ``L1Loss``, ...) and functions
      with a ``"gaussian"`` or ``"bernoulli"`` likelihood: the number of elements.
    * A function with a ``"categorical"`` likelihood (taken to be a mean over its counted
      positions): the number of targets in ``[0, C)`` (``C = out_shape[-1]``; without
      ``out_shape``, the non-negative targets).

    Returns:
        The normaliser, or ``None`` where it cannot be known from the loss and the targets
        alone (another function, non-tensor targets) or the loss is a sum
        (``reduction="sum"``: batches are summed, not averaged).

    Example:
        >>> loss_normalizer(torch.nn.CrossEntropyLoss(), None, torch.tensor([[1, -100, 0]]))
        2.0
    """
    return OutputCurvature(loss_fn, likelihood).normalizer(targets, out_shape)


def output_curvature(
    loss_fn: Callable[[Tensor, Any], Tensor], likelihood: str | None = None
) -> OutputCurvature:
    """The :class:`OutputCurvature` of a loss."""
    return OutputCurvature(loss_fn, likelihood)
