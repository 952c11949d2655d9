"""Optimizers with a stochastic diagonal Hessian preconditioner: AdaHessian and Sophia.
Both draw the diagonal from :func:`hesse.solvers.hutchinson_diagonal_probe`; their update
rules are :func:`hesse.solvers.adahessian_update` and :func:`hesse.solvers.sophia_update`,
which these classes call on each group's tensors (kept in ``self.state`` under
``torch.optim``'s names) before applying the updates."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from hesse._core._checks import check_choice, check_seed, derive_seed
from hesse.func._model import _DEFAULT_IO
from hesse.optim._base import (
    Closure,
    FlatOptimizer,
    GroupSetting,
    check_betas,
    check_int,
    check_real,
)
from hesse.solvers import (
    AdaHessianState,
    SophiaState,
    adahessian_update,
    gnb_diagonal,
    hutchinson_diagonal_probe,
    sophia_update,
    spatial_average,
)


def _check_seed(value: object, name: str) -> int:
    try:
        return check_seed(value, name, allow_none=False)
    except TypeError as err:  # one exception type for every bad hyper-parameter
        raise ValueError(str(err)) from None


class _DiagonalCurvature(FlatOptimizer):
    """The shared part: the closure run with the gradient's graph every ``update_each``
    steps, the probe drawn from a generator seeded with (``seed``, step), both in the
    state dict (so a restored optimizer draws the same probes).

    ``update_each`` and ``seed`` (and each subclass's own such settings) are kept in the
    parameter groups, where ``state_dict()`` records them; they are one setting for the
    whole optimizer, the same in every group."""

    update_each = GroupSetting()
    seed = GroupSetting()
    _global_settings = ("update_each", "seed")
    _late_settings = ("update_each", "seed")

    def _global(self) -> dict:
        state = self.global_state()
        if "step" not in state:
            state["step"] = 0
        return state

    def _generator(self, device: torch.device) -> torch.Generator:
        """The probes of step t come from a generator seeded with
        ``derive_seed(seed, "hutchinson", t)``: a restored optimizer (whose state holds t)
        draws the same probes as one never interrupted, and every process of a
        data-parallel run the same probes (its products are reduced)."""
        step = int(self._global()["step"])
        return torch.Generator(device=device).manual_seed(
            derive_seed(self.seed, "hutchinson", step)
        )

    def _refresh(self) -> bool:
        """Whether this step draws a new estimate of the diagonal."""
        return self._global()["step"] % self.update_each == 0

    def _probe(self, ev, samples: int) -> list[Tensor]:
        flat = self.flat

        def hvp(z: list[Tensor]) -> list[Tensor]:
            return ev.hvp_list(z, flat.params)

        return hutchinson_diagonal_probe(hvp, flat.params, self._generator(flat.device), samples)

    def _evaluate_checked(self, closure, curvature_now: bool):
        ev = self._evaluate(f"{type(self).__name__}: the step's evaluation", closure, curvature_now)
        if not ev.finite:
            raise FloatingPointError(f"the loss or its gradient is not finite (loss {ev.f})")
        return ev


class AdaHessian(_DiagonalCurvature):
    r"""AdaHessian (Yao et al. 2021): Adam with the squared gradient replaced by the
    squared Hutchinson estimate of the Hessian diagonal,

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2, \quad
        \theta_t = \theta_{t-1} - \eta\, \frac{\hat m_t}{(\sqrt{\hat v_t})^k + \epsilon},

    :math:`D_t = z \odot H z` spatially averaged for convolution kernels, refreshed every
    ``update_each`` steps and the last one reused in between (the "Hessian delay"; every
    step averages it into :math:`v`, so the bias correction :math:`1 - \beta_2^t` is
    exact), :math:`k` the Hessian power; decoupled weight decay. The closure is plain; the
    optimizer runs it with ``backward(create_graph=True)`` itself on the steps that refresh
    :math:`D`.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = AdaHessian(model.parameters(), lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> for _ in range(30):
        ...     last = opt.step(closure)
        >>> bool(last < first)
        True
    """

    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": check_real,  # 0 (the end of a schedule) means no move, as in torch.optim
        "betas": check_betas,
        "eps": check_real,
        "weight_decay": check_real,
        "hessian_power": partial(check_real, hi=1.0),
        "update_each": check_int,
        "n_samples": check_int,
        "seed": _check_seed,
    }
    _state_keys = frozenset(("step", "hess_diag", "exp_avg", "exp_hessian_diag_sq"))
    n_samples = GroupSetting()
    _global_settings = ("update_each", "seed", "n_samples")
    _late_settings = ("update_each", "seed", "n_samples")

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        seed: int = 0,
    ):
        defaults = {
            "lr": check_real(lr, "lr"),
            "betas": check_betas(betas),
            "eps": check_real(eps, "eps"),
            "weight_decay": check_real(weight_decay, "weight_decay"),
            "hessian_power": check_real(hessian_power, "hessian_power", hi=1.0),
            "update_each": check_int(update_each, "update_each"),
            "n_samples": check_int(n_samples, "n_samples"),
            "seed": _check_seed(seed, "seed"),
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure) -> Tensor:
        self.check_groups()
        state = self._global()
        refresh = self._refresh()
        ev = self._evaluate_checked(closure, refresh)
        if refresh:
            diag = spatial_average(self._probe(ev, self.n_samples))
            for p, d in zip(self.flat.params, diag):
                self.state[p]["hess_diag"] = d
        ev.release()
        t = state["step"]
        state["step"] += 1
        i = 0
        # one call per group (foreach kernels inside); frozen parameters are not in flat
        for group, ps in zip(self.param_groups, self.flat.groups):
            gs = ev.grads[i : i + len(ps)]
            i += len(ps)
            ps, (gs,) = _with_grad(ps, gs)
            states = _moments(self.state, ps, "exp_hessian_diag_sq")
            # the last estimate of the diagonal, a new one or the one of the last refresh
            # (the "Hessian delay" of Yao et al.): v averages D^2 at every step, so that
            # its bias correction 1 - b2^t, which counts every step, is the right one
            updates, _ = adahessian_update(
                gs,
                [st["hess_diag"] for st in states],
                AdaHessianState(
                    t,
                    [st["exp_avg"] for st in states],
                    [st["exp_hessian_diag_sq"] for st in states],
                ),
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                hessian_power=group["hessian_power"],
            )
            _apply(ps, updates, group)
        return torch.tensor(ev.f)


def _with_grad(ps: list[Tensor], *lists: list[Tensor]) -> tuple[list[Tensor], tuple]:
    """The parameters that have a gradient after the closure, and the matching entries
    of ``lists``: as torch.optim's Adam and AdamW, a parameter without one (unused in this
    forward pass) is skipped, neither decayed nor moved, and its moments are left alone."""
    keep = [j for j, p in enumerate(ps) if p.grad is not None]
    if len(keep) == len(ps):
        return ps, lists
    return [ps[j] for j in keep], tuple([x[j] for j in keep] for x in lists)


def _moments(state: dict, ps: list[Tensor], second: str) -> list[dict]:
    """Each parameter's state, with its moments ``exp_avg`` and ``second`` made (zeros)
    on its first step."""
    states = [state[p] for p in ps]
    for p, st in zip(ps, states):
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
            st[second] = torch.zeros_like(p)
    return states


def _apply(ps: list[Tensor], updates: list[Tensor], group: dict, scale: float = 1.0) -> None:
    r"""The parameters' move: decoupled weight decay as torch.optim.AdamW's,
    :math:`\theta (1 - \eta \lambda)`, then ``scale`` times the updates added (one kernel
    each)."""
    if group["weight_decay"]:
        torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
    torch._foreach_add_(ps, updates, alpha=scale)


ESTIMATORS = ("hutchinson", "gnb")


def _check_estimator(value: object, name: str) -> str:
    return check_choice(value, name, ESTIMATORS)


class Sophia(_DiagonalCurvature):
    r"""Sophia (Liu et al. 2023): momentum divided by a clipped, exponentially averaged
    diagonal Hessian estimate refreshed every ``update_each`` steps,

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        h_t = \beta_2 h_{t-k} + (1-\beta_2) \hat h_t, \quad
        \theta_t = \theta_{t-1} - \eta\, \mathrm{clip}\!\left(\frac{m_t}{\max(\gamma h_t,
        \epsilon)}, 1\right),

    with decoupled weight decay. Estimators :math:`\hat h`: ``"hutchinson"``
    (:math:`z \odot Hz`, from the closure run with the gradient's graph) or ``"gnb"``
    (Gauss-Newton-Bartlett, :math:`B\, \hat g \odot \hat g` with :math:`\hat g` the
    gradient of the cross-entropy of the model's outputs against labels *sampled* from
    them): pass ``step(closure, outputs_fn=...)`` with ``outputs_fn()`` returning the
    logits of the batch, shape ``(B, classes)``, on the steps that refresh. Sequence
    logits ``(B, T, classes)`` count as ``B T`` rows (the mean cross-entropy over tokens),
    and a Hugging Face ``ModelOutput`` gives its ``logits``.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = Sophia(model.parameters(), lr=0.05)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> for _ in range(40):
        ...     last = opt.step(closure)
        >>> bool(last < first)
        True
    """

    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": check_real,  # 0 (the end of a schedule) means no move, as in torch.optim
        "betas": check_betas,
        "rho": partial(check_real, open_lo=True),
        "weight_decay": check_real,
        "eps": partial(check_real, open_lo=True),
        "update_each": check_int,
        "estimator": _check_estimator,
        "seed": _check_seed,
    }
    _state_keys = frozenset(("step", "exp_avg", "hessian"))
    estimator = GroupSetting()
    _global_settings = ("update_each", "seed", "estimator")
    _late_settings = ("update_each", "seed", "estimator")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.0,
        eps: float = 1e-15,
        update_each: int = 10,
        estimator: str = "hutchinson",
        seed: int = 0,
    ):
        defaults = {
            "lr": check_real(lr, "lr"),
            "betas": check_betas(betas),
            "rho": check_real(rho, "rho", open_lo=True),
            "weight_decay": check_real(weight_decay, "weight_decay"),
            "eps": check_real(eps, "eps", open_lo=True),
            "update_each": check_int(update_each, "update_each"),
            "estimator": _check_estimator(estimator, "estimator"),
            "seed": _check_seed(seed, "seed"),
        }
        super().__init__(params, defaults)

    def _gnb(self, outputs_fn: Callable[[], Tensor]) -> list[Tensor]:
        """The Gauss-Newton-Bartlett estimate of a refresh step: the sampled-label gradient
        (through the reducer: its batch-size-weighted mean over processes, each drawing
        its own labels) and the number of rows it was taken over."""
        step = int(self._global()["step"])
        seed = derive_seed(self._reducer.shard_seed(self.seed), "sophia-gnb-labels", step)
        labels = torch.Generator().manual_seed(seed)
        grads, b = self._reducer.mean(
            "Sophia: the Gauss-Newton-Bartlett gradient",
            lambda: self._gnb_gradient(outputs_fn, labels),
            self.flat.params,
        )
        if b == 0:
            raise ValueError(
                "outputs_fn() returned no rows of logits (on every process): the "
                "Gauss-Newton-Bartlett estimate needs at least one sample"
            )
        return gnb_diagonal(grads, b)

    def _gnb_gradient(
        self, outputs_fn: Callable[[], Tensor], cpu: torch.Generator
    ) -> tuple[list[Tensor], int]:
        """The gradient of the mean cross-entropy of the outputs against labels sampled
        from them (labels drawn from ``cpu``), and the batch size."""
        with torch.enable_grad():
            # a model's raw output (a Hugging Face ModelOutput) gives its logits; a sequence
            # model's (B, T, classes) are B*T rows of logits
            logits = _DEFAULT_IO.select(outputs_fn())
            if logits.dim() < 2:
                raise ValueError(
                    "outputs_fn must return the batch's logits, shape (B, classes) or "
                    f"(B, ..., classes), got shape {tuple(logits.shape)}"
                )
            logits = logits.reshape(-1, logits.shape[-1])
            if logits.shape[0] == 0:  # no samples: nothing to estimate from
                return [torch.zeros_like(p) for p in self.flat.params], 0
            probs = torch.softmax(logits.detach().float().cpu(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=cpu).squeeze(1).to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            grads = torch.autograd.grad(loss, self.flat.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.flat.params)]
        return grads, logits.shape[0]

    @torch.no_grad()
    def step(self, closure: Closure, outputs_fn: Callable[[], Tensor] | None = None) -> Tensor:
        self.check_groups()
        state = self._global()
        refresh = self._refresh()
        error = None
        if self.estimator == "gnb" and refresh and outputs_fn is None:
            error = ValueError(
                "estimator='gnb' needs step(closure, outputs_fn=...) on refresh steps"
            )
        self._reducer.check("Sophia: outputs_fn", error)
        ev = self._evaluate_checked(closure, refresh and self.estimator == "hutchinson")
        if refresh:
            diag = self._probe(ev, 1) if self.estimator == "hutchinson" else self._gnb(outputs_fn)
        ev.release()
        i = 0
        # one call per group (foreach kernels inside); frozen parameters are not in flat
        for group, ps in zip(self.param_groups, self.flat.groups):
            gs = ev.grads[i : i + len(ps)]
            ds = diag[i : i + len(ps)] if refresh else gs
            i += len(ps)
            ps, (gs, ds) = _with_grad(ps, gs, ds)
            states = _moments(self.state, ps, "hessian")
            updates, _ = sophia_update(
                gs,
                SophiaState(
                    state["step"],
                    [st["exp_avg"] for st in states],
                    [st["hessian"] for st in states],
                ),
                ds if refresh else None,
                betas=group["betas"],
                rho=group["rho"],
                eps=group["eps"],
            )
            _apply(ps, updates, group, scale=group["lr"])
        state["step"] += 1
        return torch.tensor(ev.f)
