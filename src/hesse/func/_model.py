"""A model and a loss as pure functions of (some of) the model's parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesse._core import ParamSpace, check_scalar
from hesse.func._context import holds_cuda_rnn, second_order
from hesse.func._io import ModelIO, map_tensors
from hesse.func._output import OutputCurvature

Batch = Any  # a pair (inputs, targets), or one dict holding the targets (see ModelIO)

_DEFAULT_IO = ModelIO()


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
            order. A tied parameter (one tensor under several names, such as GPT-2's
            ``lm_head.weight`` and ``transformer.wte.weight``) appears once, under the
            name ``model.named_parameters()`` gives it; any of its names selects it.
        io: how batches reach the model and which output the loss sees
            (:class:`ModelIO`; the defaults cover tensors, tuples, dicts, Hugging Face
            batches and ``ModelOutput``).

    Every forward pass runs in :func:`~hesse.func.second_order` (attention kernels with
    double backward), so any graph it records can be differentiated twice; with
    ``second_order=False`` (first derivatives only) the model's own kernels run.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        params: Sequence[Tensor | str] | None = None,
        io: ModelIO | None = None,
        *,
        second_order: bool = True,
    ):
        self.second_order = bool(second_order)
        if io is not None and not isinstance(io, ModelIO):
            raise TypeError(f"io must be a hesse.ModelIO, got {type(io).__name__}")
        self.io = io if io is not None else ModelIO()
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
            names = self._resolve(model, named, params)
        self.model = model
        self.loss_fn = loss_fn
        reduction = getattr(loss_fn, "reduction", "mean")
        self._normalizer = (
            OutputCurvature(loss_fn).normalizer if reduction in ("mean", "sum") else None
        )
        self.names: tuple[str, ...] = tuple(names)
        self._selected = [named[n] for n in names]
        # every name of each parameter (tied ones have several), for _state
        every = list(model.named_parameters(remove_duplicate=False))
        chosen = {id(p) for p in self._selected}
        self._aliases = [[a for a, q in every if q is p] for p in self._selected]
        # the other parameters by owner and attribute, read at each call (a parameter the
        # user reassigns is seen; the module tree is not walked again)
        self._others = [
            (a, model.get_submodule(a.rpartition(".")[0]), a.rpartition(".")[2])
            for a, q in every
            if id(q) not in chosen
        ]
        self._modules = list(model.modules())
        self._buffer_owners = [m for m in self._modules if m._buffers]
        self.space = ParamSpace(self._selected, names)
        # whether the second-order context must turn cuDNN off for RNNs (the device is
        # fixed by the parameter space)
        self._cuda_rnn = holds_cuda_rnn(model)
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
    def _resolve(
        model: nn.Module, named: dict[str, Tensor], params: Sequence[Tensor | str]
    ) -> list[str]:
        if isinstance(params, (Tensor, str)):
            params = [params]
        if isinstance(params, Mapping) or not isinstance(params, Iterable):
            raise TypeError(
                "params must be a parameter of the model, its name, or a list of them, got "
                f"{type(params).__name__} {params!r}"
            )
        by_id = {id(p): n for n, p in named.items()}
        # every name of a tied parameter leads to its canonical (first) name
        alias = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        names: list[str] = []
        for p in params:
            if isinstance(p, str):
                if p not in alias:
                    raise ValueError(
                        f"params names {p!r}, but the model has no parameter of that name; "
                        f"it has {list(named)}"
                    )
                names.append(alias[p])
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
            raise ValueError(f"params names a parameter twice (tied names count as one): {names}")
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
        ``.data`` bypass these counters and cannot be seen. The modules are listed once;
        their parameters and buffers are read at each call (a reassigned one is seen as a
        change: its identity is part of the answer)."""
        return tuple(
            (id(t), t._version)
            for m in self._modules
            for d in (m._parameters, m._buffers)
            for t in d.values()
            if t is not None
        )

    def _state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """What ``functional_call`` swaps in: ``params`` under every name of the selected
        parameters (tied ones have several), the other parameters detached (no graph
        towards them), and, in train mode, copies of the buffers. The name lists are made
        once (in :meth:`__init__`): walking the modules at every forward pass was a
        measurable share of a product on a launch-bound GPU."""
        state: dict[str, Tensor] = {}
        for alias, module, name in self._others:
            p = module._parameters.get(name)
            if p is not None and p.requires_grad:
                state[alias] = p.detach()
        for aliases, p in zip(self._aliases, params):
            for n in aliases:
                state[n] = p
        if any(m.training for m in self._buffer_owners):
            # In train mode BatchNorm writes its running statistics in place: give it copies
            # (made inside any torch.func transform, so that writing to them is allowed).
            for n, b in self.model.named_buffers():
                state[n] = b.clone()
        return state

    def forward(self, params: Sequence[Tensor], inputs: object) -> Any:
        """The model's raw output at ``params`` for ``inputs`` (recorded in the
        second-order context unless ``second_order=False``)."""
        try:
            if not self.second_order:
                return self.io.forward(self.model, self._state(params), inputs, tie_weights=False)
            with second_order(self._cuda_rnn):
                return self.io.forward(self.model, self._state(params), inputs, tie_weights=False)
        except RuntimeError as err:
            self._explain_dtype(params, inputs, err)
            raise

    def _explain_dtype(self, params: Sequence[Tensor], inputs: object, err: Exception) -> None:
        """Turn torch's "mat1 and mat2 must have the same dtype" from a batch whose floating
        dtype is not the model's into one sentence that says which to convert."""
        if "dtype" not in str(err) or not params:
            return
        want = params[0].dtype
        got: set[torch.dtype] = set()

        def visit(t: Tensor) -> Tensor:
            if t.is_floating_point() and t.dtype != want:
                got.add(t.dtype)
            return t

        map_tensors(inputs, visit)
        if got:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in got))
            raise TypeError(
                f"the batch's inputs are {names} but the model's parameters are "
                f"{str(want).removeprefix('torch.')}; convert one to the other (for example "
                f"inputs.to({want}) or model.to({got.pop()})) before building the operator"
            ) from err

    def outputs(self, params: Sequence[Tensor], inputs: object) -> Tensor:
        """The output tensor the loss sees (``io.select``) at ``params`` for ``inputs``."""
        if self._randomness_checked:
            return self.io.select(self.forward(params, inputs))
        devices = {p.device for p in self._selected if p.device.type == "cuda"}
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        out = self.forward(params, inputs)
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
        return self.io.select(out)

    def split(self, batch: Batch) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a batch."""
        return self.io.split(batch)

    def weight(self, batch: Batch) -> float:
        """The weight of a batch in an operator over several batches: ``io.weight`` if
        given, else the number the loss's mean divides by where the loss module tells it
        (:func:`~hesse.func.loss_normalizer`: targets other than ``ignore_index`` of a
        cross-entropy, elements of an elementwise mean), else the number of samples. A
        loss written as a function that averages over tokens needs ``io.weight``."""
        if self.io.weight is not None:
            w = self.io.weight(batch)
            w = float(w.item() if isinstance(w, Tensor) else w)
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"io.weight(batch) must be a finite number >= 0, got {w}")
            return w
        if self._normalizer is not None:
            w = self._normalizer(self.io.split(batch)[1])
            if w is not None:
                return w
        return self.io.samples(batch)

    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        """The scalar loss at ``params`` on ``batch``."""
        inputs, targets = self.io.split(batch)
        out = self.outputs(params, inputs)
        try:
            value = self.loss_fn(out, targets)
        except AttributeError as err:
            raise TypeError(
                f"loss_fn failed on the model's output ({err}): hesse passes loss_fn the "
                f"output tensor that io.output={self.io.output!r} selects (for a Hugging "
                "Face model, the logits), not the whole model output; write the loss on "
                "that tensor, or choose the tensor with io=hesse.ModelIO(output=...)"
            ) from err
        return check_scalar(value, "loss_fn(...)")
