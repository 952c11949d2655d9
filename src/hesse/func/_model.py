"""A model and a loss as pure functions of (some of) the model's parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hesse._core import ParamSpace, check_scalar

Batch = Any  # a pair (inputs, targets)


def split_batch(batch: object) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch, or raise a clear error."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "each batch must be a pair (inputs, targets), got "
            + (
                f"a {type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list))
                else type(batch).__name__
            )
        )
    return batch[0], batch[1]


def _first_tensor(x: object) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch: the leading dimension of its first input tensor."""
    inputs, _ = split_batch(batch)
    t = _first_tensor(inputs)
    if t is None or t.dim() == 0:
        raise TypeError("the inputs of a batch must hold a tensor with a leading batch dimension")
    return int(t.shape[0])


def _call(model: nn.Module, state: dict[str, Tensor], inputs: object) -> Tensor:
    if isinstance(inputs, dict):
        return functional_call(model, state, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, state, tuple(inputs))
    return functional_call(model, state, (inputs,))


class ModelLoss:
    """``(model, loss_fn)`` as the pure functions ``outputs(params, inputs)`` and
    ``loss(params, batch)`` of the selected parameters.

    The other parameters and the buffers are read from the model at each call, so the
    functions follow the model as it trains. Nothing of the model is modified: its
    train/eval mode is kept, and in train mode BatchNorm updates copies of the running
    statistics, never the model's own.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        params: the parameters that span the flat vector, as tensors of the model or their
            names; by default every parameter that requires grad, in ``model.parameters()``
            order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        params: Sequence[Tensor | str] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Its forward pass would add DDP's gradient hooks; hesse.distributed reduces
            # the curvature itself. The wrapped module has the same parameters.
            model = model.module
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError(
                    "the model has no parameter that requires grad; pass params= to choose some"
                )
        else:
            names = self._resolve(named, params)
        self.model = model
        self.loss_fn = loss_fn
        self.names: tuple[str, ...] = tuple(names)
        self._selected = [named[n] for n in names]
        self.space = ParamSpace(self._selected, names)
        self._randomness_checked = False
        dropouts = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        ]
        if dropouts:
            raise ValueError(
                f"the forward pass is random: dropout module(s) {dropouts} are in train mode, "
                "so curvature products would differ from call to call; call model.eval() "
                "(or set p=0) first"
            )

    @staticmethod
    def _resolve(named: dict[str, Tensor], params: Sequence[Tensor | str]) -> list[str]:
        if isinstance(params, (Tensor, str)):
            params = [params]
        by_id = {id(p): n for n, p in named.items()}
        names: list[str] = []
        for p in params:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(
                        f"the model has no parameter named {p!r}; it has {list(named)}"
                    )
                names.append(p)
            elif isinstance(p, Tensor):
                if id(p) not in by_id:
                    raise ValueError(
                        f"params holds a tensor of shape {tuple(p.shape)} that is not a "
                        "parameter of the model"
                    )
                names.append(by_id[id(p)])
            else:
                raise TypeError(
                    f"params must hold parameters of the model or their names, got "
                    f"{type(p).__name__}"
                )
        if not names:
            raise ValueError("params is empty: select at least one parameter")
        if len(set(names)) != len(names):
            raise ValueError(f"params names a parameter twice: {names}")
        return names

    @property
    def size(self) -> int:
        return self.space.size

    def params(self) -> tuple[Tensor, ...]:
        """The current values of the selected parameters (detached, not copied)."""
        return tuple(p.detach() for p in self._selected)

    def versions(self) -> tuple[int, ...]:
        """In-place version counters of every parameter and buffer of the model (to detect
        stale caches: a block's curvature depends on the other layers too). Writes through
        ``.data`` bypass these counters and cannot be seen."""
        model = self.model
        return tuple(t._version for t in (*model.parameters(), *model.buffers()))

    def _state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        model = self.model
        state: dict[str, Tensor] = {n: p.detach() for n, p in model.named_parameters()}
        state.update(zip(self.names, params))
        training = any(m.training for m in model.modules())
        for n, b in model.named_buffers():
            # In train mode BatchNorm writes its running statistics in place: give it copies
            # (made inside any torch.func transform, so that writing to them is allowed).
            state[n] = b.clone() if training else b
        return state

    def outputs(self, params: Sequence[Tensor], inputs: object) -> Tensor:
        """The model's outputs at ``params`` for ``inputs``."""
        if self._randomness_checked:
            return _call(self.model, self._state(params), inputs)
        devices = {p.device for p in self._selected if p.device.type == "cuda"}
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        out = _call(self.model, self._state(params), inputs)
        changed = not torch.equal(cpu_state, torch.get_rng_state()) or any(
            not torch.equal(s, torch.cuda.get_rng_state(d)) for s, d in zip(cuda_states, devices)
        )
        if changed:
            raise ValueError(
                "the forward pass is random (it drew from torch's random number generator), "
                "so curvature products would differ from call to call; put the model in eval "
                "mode or remove the random layers"
            )
        self._randomness_checked = True
        return out

    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        """The scalar loss at ``params`` on ``batch``."""
        inputs, targets = split_batch(batch)
        return check_scalar(self.loss_fn(self.outputs(params, inputs), targets), "loss_fn(...)")
