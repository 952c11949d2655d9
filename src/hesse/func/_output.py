r"""The loss as a function of the model's outputs: its Hessian and its Fisher factors.

For ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` the Hessian with respect
to the outputs has a closed form; any other loss gets it from autograd.

The Fisher is expressed through factors :math:`s` of the loss's negative log-likelihood
(NLL): a loss is :math:`c \sum_i \mathrm{NLL}_i` (``c = 1/N`` for a mean over ``N``
samples, ``1/(N D)`` for a mean over all ``N D`` entries of MSE or BCE, ``1`` for a sum), and

.. math:: F = c \sum_i J_i^\top \Big(\tfrac{1}{M}\sum_m s_{im} s_{im}^\top\Big) J_i

with :math:`s_{im} = \nabla_{o_i}\mathrm{NLL}_i(o_i, y)` at the true target (empirical
Fisher, ``M = 1``) or at targets drawn from the model's predictive distribution
(Monte-Carlo Fisher), whose expectation is the GGN. For MSE the likelihood is the Gaussian
with variance 1/2, whose NLL is :math:`\|o - y\|^2`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn import functional as F

FISHER_KINDS = ("empirical", "mc")


def _reduction(loss_fn: object) -> str:
    return getattr(loss_fn, "reduction", "mean")


class OutputCurvature:
    """Curvature of ``loss_fn(outputs, targets)`` with respect to ``outputs``.

    Args:
        loss_fn: the loss; closed forms are used for :class:`torch.nn.MSELoss`,
            :class:`torch.nn.CrossEntropyLoss` and :class:`torch.nn.BCEWithLogitsLoss`
            where their options allow, autograd otherwise.
    """

    def __init__(self, loss_fn: Callable[[Tensor, Any], Tensor]):
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

    # -- which cases have closed forms ---------------------------------------------------
    def _closed_form(self, out: Tensor, targets: Any) -> bool:
        if not isinstance(targets, Tensor):
            return False
        if self.kind == "mse":
            return targets.shape == out.shape
        if self.kind == "cross_entropy":
            lf = self.loss_fn
            if out.dim() != 2:
                return False
            if targets.dtype == torch.long and targets.shape == out.shape[:1]:
                return lf.weight is None or lf.label_smoothing == 0.0
            return (
                targets.shape == out.shape
                and targets.is_floating_point()
                and (lf.label_smoothing == 0.0)
            )
        if self.kind == "bce_logits":
            lf = self.loss_fn
            return lf.weight is None and lf.pos_weight is None and targets.shape == out.shape
        return False

    def _ce_sample_weights(self, out: Tensor, targets: Tensor) -> Tensor:
        """Per-sample factors ``c_i`` with ``loss = sum_i c_i * NLL_i`` for cross-entropy."""
        lf = self.loss_fn
        n = out.shape[0]
        if targets.dtype == torch.long:
            valid = (targets != lf.ignore_index).to(out.dtype)
            w = (
                valid
                if lf.weight is None
                else lf.weight.to(out.dtype)[targets.clamp(0, out.shape[1] - 1)] * valid
            )
            if self.reduction == "mean":
                w = w / w.sum().clamp_min(torch.finfo(out.dtype).tiny)
            return w
        # probability targets: the Hessian of -sum_c w_c q_c log p_c is
        # (sum_c w_c q_c) (diag p - p p^T)
        w = targets.sum(1) if lf.weight is None else targets @ lf.weight.to(out.dtype)
        return w / n if self.reduction == "mean" else w

    def _scale(self, out: Tensor) -> float:
        """``c`` of ``loss = c * sum NLL`` for MSE and BCE."""
        return 1.0 / out.numel() if self.reduction == "mean" else 1.0

    # -- Hessian with respect to the outputs ---------------------------------------------
    def hessian_mm(self, out: Tensor, targets: Any, U: Tensor) -> Tensor:
        """``H_out @ u`` for each ``u`` in ``U`` of shape ``(k, *out.shape)``."""
        out = out.detach()
        if self._closed_form(out, targets):
            if self.kind == "mse":
                return (2.0 * self._scale(out)) * U
            if self.kind == "bce_logits":
                s = torch.sigmoid(out)
                return (self._scale(out) * s * (1 - s)) * U
            p = torch.softmax(out, dim=1)
            c = self._ce_sample_weights(out, targets)
            pu = (p * U).sum(-1, keepdim=True)
            return c[:, None] * p * (U - pu)
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
        out = out.detach()
        n = out.shape[0]
        if kind == "empirical":
            c = self._nll_scales(out, targets)
            with torch.enable_grad():
                g = grad(lambda o: self.loss_fn(o, targets))(out)
            # s_i = g_i / c_i, the gradient of sample i's NLL; samples with c_i = 0 add nothing.
            safe = torch.where(c == 0, torch.ones_like(c), c)
            s = g / safe.reshape(n, *([1] * (out.dim() - 1)))
            return s.unsqueeze(0), c
        if kind != "mc":
            raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
        if self.kind == "generic" or (self.kind != "mse" and not self._closed_form(out, targets)):
            raise ValueError(
                "kind='mc' needs the likelihood behind the loss: it supports MSELoss, "
                "CrossEntropyLoss (2-d logits, no class weights with label smoothing) and "
                f"BCEWithLogitsLoss (no weights); got {type(self.loss_fn).__name__}; "
                "use kind='empirical' or GGNOperator"
            )
        if self.kind == "cross_entropy" and self.loss_fn.weight is not None:
            raise ValueError("kind='mc' does not support CrossEntropyLoss with class weights")
        if self.kind == "mse":
            z = torch.randn(
                (mc_samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device
            )
            return (2.0**0.5) * z, torch.full(
                (n,), self._scale(out), dtype=out.dtype, device=out.device
            )
        if self.kind == "bce_logits":
            p = torch.sigmoid(out).expand(mc_samples, *out.shape)
            y = torch.bernoulli(p, generator=generator)
            return p - y, torch.full((n,), self._scale(out), dtype=out.dtype, device=out.device)
        p = torch.softmax(out, dim=1)
        idx = torch.multinomial(p, mc_samples, replacement=True, generator=generator)  # (N, M)
        onehot = F.one_hot(idx.T, out.shape[1]).to(out.dtype)  # (M, N, C)
        c = (
            self._ce_sample_weights(out, targets)
            if targets.dtype == torch.long
            else torch.full(
                (n,),
                1.0 / n if self.reduction == "mean" else 1.0,
                dtype=out.dtype,
                device=out.device,
            )
        )
        return p.unsqueeze(0) - onehot, c

    def _nll_scales(self, out: Tensor, targets: Any) -> Tensor:
        n = out.shape[0]
        if (
            self.kind == "cross_entropy"
            and isinstance(targets, Tensor)
            and targets.dtype == torch.long
            and targets.shape == out.shape[:1]
        ):
            return self._ce_sample_weights(out, targets)
        if self.kind in ("mse", "bce_logits"):
            c = self._scale(out)
        else:
            c = 1.0 / n if self.reduction == "mean" else 1.0
        return torch.full((n,), c, dtype=out.dtype, device=out.device)


def fisher_mm(S: Tensor, c: Tensor, U: Tensor) -> Tensor:
    """Apply the output-space Fisher of factors ``(S, c)`` to ``U`` of shape ``(k, *out)``."""
    m, n = S.shape[0], S.shape[1]
    k = U.shape[0]
    Sf = S.reshape(m, n, -1)
    coeff = torch.einsum("mnd,knd->kmn", Sf, U.reshape(k, n, -1)) * (c / m)
    return torch.einsum("kmn,mnd->knd", coeff, Sf).reshape(U.shape)


def output_curvature(loss_fn: Callable[[Tensor, Any], Tensor]) -> OutputCurvature:
    """The :class:`OutputCurvature` of a loss."""
    return OutputCurvature(loss_fn)
