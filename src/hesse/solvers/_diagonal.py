r"""The mathematics of AdaHessian and Sophia: the stochastic diagonal of the Hessian they
use, and their update rules as pure functions over lists of tensors with small states
(in the way of optax's ``scale_by_adam``).

One Rademacher probe :math:`z` gives :math:`z \odot H z`, an unbiased estimate of
:math:`\mathrm{diag}(H)` (Bekas, Kokiopoulou & Saad 2007); the optimizers average it over
steps. (:func:`hesse.linalg.hutchinson_diagonal` is the many-probe estimator on an
operator, with standard errors; this is the one-probe form on a list of parameter
tensors. Both take the probe step from :func:`hesse.linalg._diag.probe_diagonal` and the
signs from :func:`hesse._core._random.rademacher`.) Sophia may use the Gauss-Newton-Bartlett
estimate instead (:func:`gnb_diagonal`).

:func:`adahessian_update` and :func:`sophia_update` take the gradients, the estimate and
a state (:class:`AdaHessianState`, :class:`SophiaState`: the step count and the moments,
from :func:`adahessian_init` / :func:`sophia_init`) and return the updates and the new
state. They never see the parameters: the caller applies decoupled weight decay,
:math:`\theta \leftarrow \theta (1 - \eta \lambda)`, and then adds the updates
(AdaHessian's, which carry the learning rate) or :math:`\eta` times them (Sophia's, the
step per unit learning rate): :class:`hesse.optim.AdaHessian` and
:class:`hesse.optim.Sophia` do this. The moments are updated in place with foreach kernels
(as ``torch.optim``'s optimizers do), so the new state holds the old state's tensors and
the old state must not be used again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._core._checks import check_int
from hesse._core._random import rademacher
from hesse.linalg._diag import probe_diagonal


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Random signs shaped like each tensor (its dtype, its device), drawn from
    ``generator`` in order (:func:`hesse._core._random.rademacher`, one call per tensor).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [z.shape for z in rademacher_like([torch.zeros(2, 3), torch.zeros(4)], g)]
        [torch.Size([2, 3]), torch.Size([4])]
    """
    return [
        rademacher(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in tensors
    ]


def hutchinson_diagonal_probe(
    hvp: Callable[[list[Tensor]], Sequence[Tensor]],
    like: Sequence[Tensor],
    generator: torch.Generator,
    samples: int = 1,
) -> list[Tensor]:
    r""":math:`\frac1s \sum_{j=1}^s z_j \odot H z_j` for ``samples`` Rademacher probes,
    one tensor per parameter.

    Example:
        >>> H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> d = hutchinson_diagonal_probe(lambda z: [H @ z[0]], [torch.zeros(2)], g, samples=2000)
        >>> d[0].round(decimals=1)
        tensor([2., 3.])
    """
    samples = check_int(samples, "samples")
    if samples == 1:  # the common case: no accumulators
        return probe_diagonal(hvp, rademacher_like(like, generator))
    total = [torch.zeros_like(t) for t in like]
    for _ in range(samples):
        for acc, d in zip(total, probe_diagonal(hvp, rademacher_like(like, generator))):
            acc.add_(d)
    return [t.div_(samples) for t in total]


def spatial_average(diag: Sequence[Tensor]) -> list[Tensor]:
    r"""AdaHessian's spatial averaging of a diagonal estimate: a convolution kernel's
    (a tensor of 3 or more dimensions) is replaced by the mean of its absolute values over
    the spatial dimensions (2 and beyond), one value per (out, in) channel pair; vectors
    and matrices are kept as they are.

    Example:
        >>> d = spatial_average([torch.tensor([[[1.0, -3.0]]]), torch.tensor([-1.0, 2.0])])
        >>> d[0], d[1]
        (tensor([[[2., 2.]]]), tensor([-1.,  2.]))
    """
    out = []
    for d in diag:
        if d.dim() > 2:
            d = d.abs().mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)
        out.append(d)
    return out


def gnb_diagonal(grads: Sequence[Tensor], batch_size: float) -> list[Tensor]:
    r"""The Gauss-Newton-Bartlett diagonal :math:`B\, \hat g \odot \hat g` (Liu et al.
    2023) from :math:`\hat g`, the gradient of the mean cross-entropy of a batch of
    :math:`B` samples against labels sampled from the model's own predictions.

    Example:
        >>> gnb_diagonal([torch.tensor([0.5, -1.0])], 4)
        [tensor([1., 4.])]
    """
    return [batch_size * g * g for g in grads]


def _opmath(x: Tensor) -> Tensor:
    """``x`` in the precision torch's kernels compute in: float32 for half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass(frozen=True)
class AdaHessianState:
    """AdaHessian's state: ``step``, the number of updates taken (the :math:`t - 1` of the
    next one), and the moments ``exp_avg`` (of the gradient) and ``exp_hessian_diag_sq``
    (of the squared diagonal estimate), one tensor per parameter."""

    step: int
    exp_avg: list[Tensor]
    exp_hessian_diag_sq: list[Tensor]


def adahessian_init(params: Sequence[Tensor]) -> AdaHessianState:
    """The state before the first step: no steps, zero moments shaped like ``params``.

    Example:
        >>> adahessian_init([torch.ones(2)])
        AdaHessianState(step=0, exp_avg=[tensor([0., 0.])], exp_hessian_diag_sq=[tensor([0., 0.])])
    """
    return AdaHessianState(
        0, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    )


def adahessian_update(
    grads: Sequence[Tensor],
    diag_estimate: Sequence[Tensor],
    state: AdaHessianState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-4,
    hessian_power: float = 1.0,
) -> tuple[list[Tensor], AdaHessianState]:
    r"""One AdaHessian update (Yao et al. 2021): Adam with the squared gradient replaced by
    the squared diagonal estimate :math:`D_t`,

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2, \quad
        u_t = -\frac{\eta}{1 - \beta_1^t}\, \frac{m_t}{\left(\sqrt{v_t / (1 - \beta_2^t)}
        \right)^k + \epsilon},

    :math:`k` the Hessian power. The caller passes the latest :math:`D_t` at every step,
    the last one again between refreshes (the "Hessian delay": so :math:`v` averages
    :math:`t` terms and its bias correction :math:`1 - \beta_2^t` is exact). Returns the
    updates :math:`u_t`, to be added to the parameters (after any decoupled weight decay;
    float32 for half-precision moments, the precision torch's kernels compute in, so that
    adding them rounds once), and the new state (``state``'s moments, updated in place).
    With :math:`D_t = |g_t|` and :math:`k = 1` this is ``torch.optim.Adam``'s step.

    Example:
        >>> state = adahessian_init([torch.zeros(2)])
        >>> g, d = [torch.tensor([1.0, -2.0])], [torch.tensor([4.0, 4.0])]
        >>> u, state = adahessian_update(g, d, state, lr=0.1, eps=0.0)
        >>> u[0], state.step  # -lr g / |D| at the first step, the bias corrections exact
        (tensor([-0.0250,  0.0500]), 1)
    """
    b1, b2 = betas
    t = state.step + 1
    m, v = state.exp_avg, state.exp_hessian_diag_sq
    # foreach: one kernel per operation over all the tensors
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, list(grads), alpha=1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, list(diag_estimate), list(diag_estimate), value=1 - b2)
    denom = torch._foreach_div(v, 1 - b2**t)
    torch._foreach_sqrt_(denom)
    if hessian_power != 1.0:
        torch._foreach_pow_(denom, hessian_power)
    torch._foreach_add_(denom, eps)
    # (-step_size m) / denom, in float32 for half precision: the rounding of
    # torch.optim.Adam's param.addcdiv_(m, denom, value=-step_size) once it is added
    updates = torch._foreach_mul([_opmath(x) for x in m], -lr / (1 - b1**t))
    torch._foreach_div_(updates, denom)
    return updates, AdaHessianState(t, m, v)


@dataclass(frozen=True)
class SophiaState:
    """Sophia's state: ``step``, the number of updates taken, and ``exp_avg`` (the
    momentum) and ``hessian`` (the averaged diagonal estimate), one tensor per
    parameter."""

    step: int
    exp_avg: list[Tensor]
    hessian: list[Tensor]


def sophia_init(params: Sequence[Tensor]) -> SophiaState:
    """The state before the first step: no steps, zero momentum and zero curvature.

    Example:
        >>> sophia_init([torch.ones(1)])
        SophiaState(step=0, exp_avg=[tensor([0.])], hessian=[tensor([0.])])
    """
    return SophiaState(
        0, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    )


def sophia_update(
    grads: Sequence[Tensor],
    state: SophiaState,
    hessian_estimate: Sequence[Tensor] | None = None,
    *,
    betas: tuple[float, float] = (0.965, 0.99),
    rho: float = 0.04,
    eps: float = 1e-15,
) -> tuple[list[Tensor], SophiaState]:
    r"""One Sophia update (Liu et al. 2023): momentum divided by the averaged diagonal
    estimate, clipped coordinate-wise,

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        h_t = \beta_2 h_{t-1} + (1-\beta_2) \hat h_t, \quad
        u_t = -\mathrm{clip}\!\left(\frac{m_t}{\max(\rho h_t, \epsilon)}, 1\right),

    where :math:`h` is averaged only on the steps that pass a ``hessian_estimate``
    :math:`\hat h_t` (Hutchinson's :math:`z \odot Hz` or :func:`gnb_diagonal`) and kept
    otherwise. Returns the updates :math:`u_t`, the step per unit learning rate (the caller
    adds :math:`\eta u_t` to the parameters, after any decoupled weight decay), and the new
    state (``state``'s tensors, updated in place).

    Example:
        >>> state = sophia_init([torch.zeros(2)])
        >>> g, h = [torch.tensor([1.0, -0.01])], [torch.tensor([1.0, 1.0])]
        >>> u, state = sophia_update(g, state, h, betas=(0.0, 0.0), rho=1.0)
        >>> u[0]  # the first coordinate clipped, the second -m / (rho h)
        tensor([-1.0000,  0.0100])
    """
    b1, b2 = betas
    m, h = state.exp_avg, state.hessian
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, list(grads), alpha=1 - b1)
    if hessian_estimate is not None:
        torch._foreach_mul_(h, b2)
        torch._foreach_add_(h, list(hessian_estimate), alpha=1 - b2)
    # -clip(m / max(rho h, eps), 1) = -sign(m) min(|m| / max(rho h, eps), 1)
    denom = torch._foreach_mul(h, rho)
    torch._foreach_clamp_min_(denom, eps)
    updates = torch._foreach_div(torch._foreach_abs(m), denom)
    torch._foreach_clamp_max_(updates, 1.0)
    torch._foreach_mul_(updates, [x.sign().neg_() for x in m])
    return updates, SophiaState(state.step + 1, m, h)
