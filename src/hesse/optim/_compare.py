"""Train one problem with several optimizers on equal terms, for tables and plots."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hesse._core._checks import check_seed
from hesse.optim._base import check_int, check_real


@dataclass
class Curve:
    """One optimizer's run: after each evaluation point, the wall-clock training time so
    far (evaluation excluded), the epoch, the optimizer steps, the loss on the whole
    training set and, with ``test_data`` and ``metric``, the metric on the test set.
    ``diverged`` is set when the training loss stopped being finite."""

    name: str
    time: list[float] = field(default_factory=list)
    epoch: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    diverged: bool = False

    def time_to(self, target: float) -> float:
        """The first time the training loss was at most ``target`` (``inf`` if never)."""
        return next((t for t, v in zip(self.time, self.loss) if v <= target), math.inf)


def _takes(opt: Optimizer, name: str) -> bool:
    return name in inspect.signature(opt.step).parameters


def compare(
    make_model: Callable[[], nn.Module],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: tuple[Tensor, Tensor],
    optimizers: Mapping[str, Callable[[nn.Module], Optimizer]],
    *,
    epochs: float | None = None,
    time_budget: float | None = None,
    batch_size: int | None = None,
    regularizer: Callable[[nn.Module], Tensor] | None = None,
    test_data: tuple[Tensor, Tensor] | None = None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
    evals_per_epoch: int = 1,
    seed: int = 0,
) -> dict[str, Curve]:
    """Train ``make_model()`` with each optimizer on equal terms and return the curves.

    Every optimizer starts from the same initial weights (``make_model`` is called under
    ``torch.manual_seed(seed)``), sees the batches in the same order (one permutation per
    epoch from a generator seeded with ``seed``), and gets the same budget: ``epochs``
    passes over the data, or ``time_budget`` seconds of training (whichever ends first).
    Each step uses a plain closure (zero the gradients, the loss on the batch plus
    ``regularizer(model)``, ``backward()``); hesse's optimizers that measure curvature on
    a batch (``step(closure, batch=...)``) receive it. The training loss on all of
    ``data`` is measured ``evals_per_epoch`` times per epoch, outside the clock.

    Args:
        make_model: builds a fresh model.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        data: ``(inputs, targets)``.
        optimizers: name -> ``model -> optimizer`` (e.g. ``lambda m: torch.optim.Adam(
            m.parameters(), lr=1e-3)``).
        epochs, time_budget: the budget (at least one).
        batch_size: by default the whole data (full batch).
        regularizer: added to the loss (e.g. an L2 penalty).
        test_data, metric: ``metric(outputs, targets)`` on held-out data at each point.
        evals_per_epoch: evaluation points per epoch.
        seed: initial weights and data order.

    Example:
        >>> X, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> curves = compare(lambda: torch.nn.Linear(3, 1), torch.nn.functional.mse_loss,
        ...                  (X, y), {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1)},
        ...                  epochs=5)
        >>> len(curves["sgd"].loss), curves["sgd"].loss[-1] < curves["sgd"].loss[0]
        (6, True)
    """
    if epochs is None and time_budget is None:
        raise ValueError("give a budget: epochs, time_budget, or both")
    if epochs is not None:
        epochs = check_real(epochs, "epochs", open_lo=True)
    if time_budget is not None:
        time_budget = check_real(time_budget, "time_budget", open_lo=True)
    check_int(evals_per_epoch, "evals_per_epoch")
    seed = check_seed(seed, allow_none=False)
    inputs, targets = _check_data(data, "data")
    if test_data is not None:
        _check_data(test_data, "test_data")
    n = inputs.shape[0]
    bs = n if batch_size is None else check_int(batch_size, "batch_size")
    steps_per_epoch = math.ceil(n / bs)
    every = max(1, steps_per_epoch // max(1, evals_per_epoch))
    max_steps = math.inf if epochs is None else math.ceil(epochs * steps_per_epoch)
    curves: dict[str, Curve] = {}
    for name, factory in optimizers.items():
        curves[name] = _train(
            name, factory, make_model, loss_fn, inputs, targets, bs, steps_per_epoch, every,
            max_steps, time_budget, regularizer, test_data, metric, seed,
        )  # fmt: skip
    return curves


def _check_data(data: object, what: str) -> tuple[Tensor, Tensor]:
    """One batch ``(inputs, targets)``: two tensors with the same number of samples."""
    ok = isinstance(data, (tuple, list)) and len(data) == 2
    if not ok or not all(isinstance(t, Tensor) for t in data):
        got = type(data).__name__
        if isinstance(data, (tuple, list)):
            got = f"a {got} of {', '.join(type(t).__name__ for t in data[:3])}"
            got += ", ..." if len(data) > 3 else ""
        raise TypeError(
            f"{what} must be one batch (inputs, targets) of two tensors, got {got} (for several "
            "batches, concatenate them and set batch_size)"
        )
    inputs, targets = data
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{what}'s inputs and targets must have the same number of samples (first "
            f"dimension), got shapes {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one sample, got none")
    return inputs, targets


def _train(
    name, factory, make_model, loss_fn, inputs, targets, bs, steps_per_epoch, every,
    max_steps, time_budget, regularizer, test_data, metric, seed,
) -> Curve:  # fmt: skip
    n = inputs.shape[0]
    torch.manual_seed(seed)
    model = make_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_model() must return a torch.nn.Module, got {type(model).__name__}")
    opt = factory(model)
    if not isinstance(opt, Optimizer):
        raise TypeError(
            f"optimizers[{name!r}](model) must return a torch.optim.Optimizer, "
            f"got {type(opt).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    curve = Curve(name)

    def objective(xb: Tensor, yb: Tensor) -> Tensor:
        value = loss_fn(model(xb), yb)
        return value + regularizer(model) if regularizer is not None else value

    def record(elapsed: float, step: int) -> bool:
        with torch.no_grad():
            value = float(objective(inputs, targets))
            if test_data is not None and metric is not None:
                curve.test.append(float(metric(model(test_data[0]), test_data[1])))
        curve.time.append(elapsed)
        curve.epoch.append(step / steps_per_epoch)
        curve.steps.append(step)
        curve.loss.append(value)
        curve.diverged = curve.diverged or not math.isfinite(value)
        return curve.diverged

    record(0.0, 0)
    elapsed, step = 0.0, 0
    batch_arg = _takes(opt, "batch")
    while step < max_steps and (time_budget is None or elapsed < time_budget):
        order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            xb, yb = (inputs, targets) if bs >= n else (inputs[idx], targets[idx])

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = objective(xb, yb)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            try:
                if batch_arg:
                    opt.step(closure, batch=(xb, yb))
                else:
                    opt.step(closure)
            except FloatingPointError:
                curve.diverged = True
            elapsed += time.perf_counter() - t0
            step += 1
            if curve.diverged or (
                (step % every == 0 or step == max_steps) and record(elapsed, step)
            ):
                return curve
            if step >= max_steps or (time_budget is not None and elapsed >= time_budget):
                break
    if curve.steps[-1] != step:
        record(elapsed, step)
    return curve
