"""KFAC as a ``torch.optim.Optimizer`` (Martens & Grosse 2015): the gradient preconditioned
with the damped inverse of running-average Kronecker factors."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import Tensor, nn

from hesse._core._checks import check_choice, check_seed, derive_seed
from hesse.func._model import ModelLoss
from hesse.operators._kfac import (
    DAMPING_METHODS,
    FISHER_TYPES,
    WEIGHT_SHARING,
    KFACOperator,
    _input_rows,
    _Layer,
    _layers,
    _output_rows,
    batch_factors,
    damped_spectrum,
)
from hesse.optim._base import Closure, FlatOptimizer, check_int, check_real


def _check_choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    return lambda value, name: check_choice(value, name, choices)


_positive = partial(check_real, open_lo=True)
_rate = partial(check_real, hi=1.0, open_hi=True)


class KFAC(FlatOptimizer):
    r"""K-FAC: steps along the gradient preconditioned by the damped inverse of a
    Kronecker-factored curvature, one block :math:`G \otimes A` per ``nn.Linear`` and
    ``nn.Conv2d`` layer (see :class:`hesse.KFACOperator`),

    .. math::
        A \leftarrow \rho A + (1-\rho) A_t, \quad G \leftarrow \rho G + (1-\rho) G_t
        \quad (\text{every } T \text{ steps}), \\
        d_t = (G \otimes A + \lambda I)^{-1} (g_t + \omega \theta_t), \quad
        m_t = \mu m_{t-1} + d_t, \quad \theta_{t+1} = \theta_t - \eta\, m_t,

    with the eigendecompositions of :math:`A` and :math:`G` refreshed every
    :math:`T_{inv}` steps (``damping_method="exact"``; ``"pi"``: Martens & Grosse's
    factored damping). The factors come from the closure itself: on the steps that refresh
    them, the layers' inputs and the gradients their outputs receive in the closure's
    ``backward()`` are recorded, so :math:`G_t` is the empirical Fisher's factor of a loss
    averaged over the batch's samples (:math:`N \sum_{i,r} g_{ir} g_{ir}^\top` with the
    leading dimension :math:`N`). Parameters outside those layers step along their
    gradient, divided by :math:`\lambda` (the same damped identity).

    Every setting lives in ``param_groups`` (a scheduler may change ``lr``, ``damping``,
    ``momentum``, ``weight_decay``; the others are read from the first group) and the
    factors, their eigendecompositions, the momentum and the step count in ``state``:
    ``state_dict()`` restores a run exactly.

    Args:
        model: the network whose parameters are optimised.
        lr, damping, momentum, weight_decay: :math:`\eta, \lambda, \mu, \omega`.
        factor_decay: :math:`\rho`, the running average's decay.
        update_each: :math:`T`, steps between factor updates.
        inverse_each: :math:`T_{inv}`, steps between eigendecompositions.
        damping_method: ``"exact"`` or ``"pi"``.
        weight_sharing: ``"expand"`` or ``"reduce"`` for sequences and convolutions.
        loss_fn, fisher, mc_samples, seed: with ``loss_fn``, the factors of a step given
            ``step(closure, batch=(inputs, targets))`` are :class:`hesse.KFACOperator`'s
            on that batch, of this ``fisher`` (``"type-2"``, ``"mc"`` with ``mc_samples``
            draws from a generator seeded with ``(seed, step)``, or ``"empirical"``);
            ``"type-2"`` and ``"mc"`` need it. :func:`hesse.optim.compare` passes the
            batch.
        params: the parameters to optimise (tensors of ``model`` or names); by default all
            that require grad.
        io, likelihood: for the batches and the loss (with ``loss_fn``), as
            :class:`hesse.KFACOperator`.
        kl_clip: if given, :math:`\kappa`: the preconditioned step is scaled by
            :math:`\nu = \min(1, \sqrt{\kappa / |\eta^2 \sum d_t^\top g_t|})` before the
            momentum (Ba, Grosse & Martens 2017; kfac-pytorch's ``kl_clip``), which bounds
            the change of the model's predictive distribution a step may make; without
            it a large step where the factors are small can diverge.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = KFAC(model, lr=0.1, damping=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> for _ in range(20):
        ...     last = opt.step(closure)
        >>> bool(last < first)
        True
    """

    _group_checks: ClassVar[dict[str, Callable]] = {
        "lr": check_real,
        "damping": _positive,
        "momentum": _rate,
        "weight_decay": check_real,
        "factor_decay": _rate,
        "update_each": check_int,
        "inverse_each": check_int,
        "damping_method": _check_choice(DAMPING_METHODS),
        "weight_sharing": _check_choice(WEIGHT_SHARING),
        "fisher": _check_choice(FISHER_TYPES),
        "mc_samples": check_int,
        "seed": lambda v, name: check_seed(v, name, allow_none=False),
        "kl_clip": lambda v, name: None if v is None else check_real(v, name, open_lo=True),
    }
    _late_settings = ("kl_clip",)
    _state_keys = frozenset(("step", "A", "G", "eig", "momentum_buffer"))

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        factor_decay: float = 0.95,
        update_each: int = 1,
        inverse_each: int = 10,
        damping_method: str = "exact",
        weight_sharing: str = "expand",
        loss_fn=None,
        fisher: str = "empirical",
        mc_samples: int = 1,
        seed: int = 0,
        params=None,
        io=None,
        likelihood: str | None = None,
        kl_clip: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = ModelLoss._resolve(model, named, params)
        if not names:
            raise ValueError("the model has no parameter that requires grad: nothing to optimise")
        fn = SimpleNamespace(model=model, names=names, _selected=[named[n] for n in names])
        defaults = {
            "lr": lr,
            "damping": damping,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "factor_decay": factor_decay,
            "update_each": update_each,
            "inverse_each": inverse_each,
            "damping_method": damping_method,
            "weight_sharing": weight_sharing,
            "fisher": fisher,
            "mc_samples": mc_samples,
            "seed": seed,
            "kl_clip": kl_clip,
        }
        for key, check in self._group_checks.items():
            defaults[key] = check(defaults[key], key)
        if fisher != "empirical" and loss_fn is None:
            raise ValueError(
                f"fisher={fisher!r} computes the factors on a batch: pass loss_fn= here and "
                "step(closure, batch=(inputs, targets))"
            )
        super().__init__(list(fn._selected), defaults)
        self._layers: list[_Layer] = _layers(fn, strict=False)
        self._selected = list(fn._selected)
        self.model, self.loss_fn, self.io, self.likelihood = model, loss_fn, io, likelihood
        self._names = fn.names

    # -- state ------------------------------------------------------------------------------
    def _owner(self, la: _Layer) -> Tensor:
        """The parameter whose state holds the layer's factors."""
        return self._selected[la.weight if la.weight is not None else la.bias]

    def _check_loaded(self) -> None:
        self.check_groups()
        owners = {id(self._owner(la)): la for la in self._layers}
        for p in self.flat.params:
            entry = self.state.get(p, {})
            unknown = sorted(set(entry) - self._state_keys)
            if unknown:
                raise ValueError(
                    f"the loaded state holds {unknown}, which KFAC does not keep: it is the "
                    "state of another optimizer class"
                )
            buf = entry.get("momentum_buffer")
            if buf is not None and buf.shape != p.shape:
                raise ValueError(
                    f"the loaded momentum_buffer has shape {tuple(buf.shape)}, its parameter "
                    f"{tuple(p.shape)}: it is the state of another model"
                )
            la = owners.get(id(p))
            if "A" in entry and (
                la is None
                or entry["A"].shape != (la.d, la.d)
                or entry["G"].shape != (la.out, la.out)
            ):
                raise ValueError(
                    "the loaded Kronecker factors do not fit this model's layers: it is the "
                    "state of another model"
                )

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure, batch=None) -> Tensor:  # type: ignore[override]
        """One step. ``batch``: with ``loss_fn`` given, the ``(inputs, targets)`` batch the
        factors are computed on (``fisher="type-2"`` or ``"mc"`` need it on the steps that
        refresh them; by default they come from the closure's backward pass)."""
        self.check_groups()
        group = self.param_groups[0]
        state = self.global_state()
        t = int(state.get("step", 0))
        update = t % group["update_each"] == 0
        on_batch = update and self.loss_fn is not None and batch is not None
        self._reducer.check("KFAC: the batch", self._batch_error(update, on_batch))
        seen: dict[str, list] = {}
        handles = []
        if update and not on_batch:
            for la in self._layers:
                seen[la.name] = []
                handles.append(la.module.register_forward_hook(partial(_record, seen[la.name])))
        try:
            ev = self._evaluate("KFAC: the step's evaluation", closure)
        finally:
            for h in handles:
                h.remove()
        if not ev.finite:
            raise FloatingPointError(f"the loss or its gradient is not finite (loss {ev.f})")
        batch = self._reducer.batch(batch)
        if update and self.loss_fn is not None and batch is not None:
            self._update_factors_on(batch, group, t)
        elif update:
            self._update_factors(seen, group)
        if t % group["inverse_each"] == 0 or (update and t == 0):
            self._eigendecompose()
        self._apply(ev.grads)
        state["step"] = t + 1
        return torch.tensor(ev.f)

    def _batch_error(self, update: bool, on_batch: bool) -> ValueError | None:
        """The error of a step that must compute the factors on a batch but has none."""
        fisher = self.param_groups[0]["fisher"]
        if update and fisher != "empirical" and not on_batch:
            return ValueError(
                f"fisher={fisher!r} computes the factors on a batch: pass "
                "step(closure, batch=(inputs, targets)) (and loss_fn= to the optimizer)"
            )
        return None

    def _update_factors(self, seen: dict[str, list], group: dict) -> None:
        """The factors from the closure's pass (empirical Fisher), through the reducer
        (across processes: their sample-weighted means, layer by layer, over the processes
        where the layer took part), averaged in."""
        layers = self._layers
        flat = self.flat

        def compute() -> tuple[list[Tensor | None], None]:
            factors = self._closure_factors(seen, group)
            return [f for la in layers for f in factors.get(la.name, (None, None))], None

        def empty(n: int) -> Tensor:
            return torch.empty(n, n, dtype=flat.dtype, device=flat.device)

        like = [t for la in layers for t in (empty(la.d), empty(la.out))]
        means, _ = self._reducer.mean("KFAC: the factors", compute, like)
        factors = {
            la.name: (means[2 * j], means[2 * j + 1])
            for j, la in enumerate(layers)
            if means[2 * j] is not None
        }
        self._average_in(factors, group["factor_decay"])

    def _closure_factors(
        self, seen: dict[str, list], group: dict
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's factors from the closure's pass, for the layers that took part."""
        expand = group["weight_sharing"] == "expand"
        factors = {}
        for la in self._layers:
            calls = seen[la.name]
            if not calls or any(g is None for _, g in calls):
                continue  # the layer did not take part in this loss
            if len(calls) > 1:
                raise ValueError(
                    f"layer {la.name!r} runs more than once in one forward pass; KFAC needs "
                    "one call per layer"
                )
            x, g = calls[0]
            n = x.shape[0]
            g = _output_rows(la.module, g[None])
            if la.weight is None:
                rows = x.new_ones(n, g.shape[2], 1)
            else:
                rows = _input_rows(la.module, x)
                if la.bias is not None:
                    rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
            a, gg = batch_factors(rows, g, expand)
            factors[la.name] = (a / n, gg * n)  # a mean over samples; gradients of a mean loss
        return factors

    def _update_factors_on(self, batch, group: dict, t: int) -> None:
        """The factors of :class:`hesse.KFACOperator` on ``batch``, averaged in."""
        names = [
            self._names[i] for la in self._layers for i in (la.weight, la.bias) if i is not None
        ]
        gen = torch.Generator().manual_seed(derive_seed(group["seed"], "kfac-mc", t))
        op = self._reducer.operator(
            KFACOperator,
            self.model,
            self.loss_fn,
            batch,
            names,
            fisher=group["fisher"],
            mc_samples=group["mc_samples"] if group["fisher"] == "mc" else 1,
            generator=gen,
            weight_sharing=group["weight_sharing"],
            likelihood=self.likelihood,
            io=self.io,
        )
        self._average_in({b.module: (b.A, b.G) for b in op.blocks}, group["factor_decay"])

    def _average_in(self, factors: dict[str, tuple[Tensor, Tensor]], rho: float) -> None:
        for la in self._layers:
            if la.name not in factors:
                continue
            a, gg = factors[la.name]
            st = self.state[self._owner(la)]
            if "A" not in st:
                st["A"], st["G"] = a.clone(), gg.clone()
            else:
                st["A"].mul_(rho).add_(a, alpha=1 - rho)
                st["G"].mul_(rho).add_(gg, alpha=1 - rho)

    def _eigendecompose(self) -> None:
        for la in self._layers:
            st = self.state[self._owner(la)]
            if "A" in st:
                la_, qa = torch.linalg.eigh(st["A"])
                lg, qg = torch.linalg.eigh(st["G"])
                st["eig"] = [la_.clamp_min(0), qa, lg.clamp_min(0), qg]

    def _direction(self, la: _Layer, M: Tensor, damping: float, method: str) -> Tensor:
        """The damped inverse block on ``M (out, d)``, from the cached eigenbasis."""
        la_, qa, lg, qg = self.state[self._owner(la)]["eig"]
        D = damped_spectrum(la_, lg, damping, method)
        return qg @ ((qg.T @ M @ qa) / D) @ qa.T

    def _apply(self, grads: list[Tensor]) -> None:
        flat = self.flat
        group_of = {id(p): flat.group_of[i] for i, p in enumerate(flat.params)}
        d: dict[int, Tensor] = {}
        for p, g in zip(flat.params, grads):
            wd = self.param_groups[group_of[id(p)]]["weight_decay"]
            d[id(p)] = g + wd * p if wd else g
        done: set[int] = set()
        method = self.param_groups[0]["damping_method"]
        for la in self._layers:
            owner = self._owner(la)
            if "eig" not in self.state[owner]:
                continue
            ps = [self._selected[i] for i in (la.weight, la.bias) if i is not None]
            parts = [d[id(p)].reshape(la.out, -1) for p in ps]
            M = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            damping = self.param_groups[group_of[id(owner)]]["damping"]
            R = self._direction(la, M, damping, method)
            start = 0
            for p, part in zip(ps, parts):
                d[id(p)] = R[:, start : start + part.shape[1]].reshape(p.shape)
                start += part.shape[1]
                done.add(id(p))
        steps = {}
        for p in flat.params:
            group = self.param_groups[group_of[id(p)]]
            steps[id(p)] = d[id(p)] if id(p) in done else d[id(p)] / group["damping"]
        clip = self.param_groups[0]["kl_clip"]
        if clip is not None:
            vg = sum(
                float((steps[id(p)] * g).sum()) * self.param_groups[group_of[id(p)]]["lr"] ** 2
                for p, g in zip(flat.params, grads)
            )
            nu = min(1.0, math.sqrt(clip / abs(vg))) if vg != 0 else 1.0
            if nu < 1.0:
                steps = {k: v * nu for k, v in steps.items()}
        for p in flat.params:
            group = self.param_groups[group_of[id(p)]]
            step = steps[id(p)]
            if group["momentum"]:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = step.clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(step)
                step = st["momentum_buffer"]
            p.add_(step, alpha=-group["lr"])


def _record(calls: list, module: nn.Module, args: tuple, output: Tensor) -> None:
    """Forward hook: keep the layer's input and, through a hook on its output, the
    gradient the output receives in the closure's backward pass."""
    entry = [args[0].detach(), None]
    calls.append(entry)
    if output.requires_grad:

        def keep(grad: Tensor) -> None:
            entry[1] = grad.detach()

        output.register_hook(keep)
