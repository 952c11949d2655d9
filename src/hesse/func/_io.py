"""How a batch reaches a model and which of its outputs the loss sees.

Models come in many shapes: ``forward(x)``, ``forward(x, mask)``, ``forward(**batch)``,
``forward(batch)``; they return a tensor, a tuple, a dict or a Hugging Face
``ModelOutput``; data comes as ``(inputs, targets)`` pairs or as one dict per batch that
holds the targets (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``).
:class:`ModelIO` is the one place that decides, with defaults that cover these cases, and
every operator, analysis function, optimizer and the CLI goes through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

CALLS = ("auto", "args", "kwargs", "single")


def first_tensor(x: object) -> Tensor | None:
    """The first tensor found in ``x`` (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for item in x:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``x`` with ``fn`` applied to every tensor in it (tuples, lists and dicts kept)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


def take_samples(batch: Any, n: int, rows: slice | Tensor) -> Any:
    """``batch`` with ``rows`` (a slice or an index tensor) taken along the first dimension
    of every tensor that holds ``n`` samples there (inputs of any layout, dict batches,
    sequence targets); any other entry is passed as it is."""

    def take(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != n:
            return t
        return t[rows] if isinstance(rows, slice) else t[rows.to(t.device)]

    return map_tensors(batch, take)


class ModelIO:
    """How batches reach the model and which output the loss sees.

    Args:
        output: which part of the model's output is the loss's first argument (and the
            outputs of the Gauss-Newton and Fisher operators). ``"auto"``: a tensor as it
            is; a dict or ``ModelOutput`` its ``"logits"`` entry, or its only tensor; a
            tuple or list its first element. A string selects a key (or attribute), an
            integer a position, a callable ``output(out) -> Tensor`` anything else.
        targets: the key of the targets in a batch given as one dict (Hugging Face
            layout); the other entries are the model's inputs. ``None`` refuses dict
            batches.
        call: how the inputs reach ``forward``: ``"args"`` (a tuple or list unpacked as
            positional arguments, anything else passed as the only one), ``"kwargs"`` (a
            dict unpacked as keyword arguments), ``"single"`` (the inputs as the only
            argument, whatever they are), or ``"auto"``: a dict as keyword arguments if
            ``forward`` accepts its keys, else as one argument if ``forward`` takes one;
            other inputs as ``"args"``.
        weight: ``weight(batch) -> float``, the weight of a batch in the operator over
            several batches of a mean loss (the number the batch's mean divides by). By
            default the number of counted targets for losses that know it (cross-entropy
            with ``ignore_index`` or class weights), else the leading dimension of the
            first input tensor.

    Example:
        >>> import torch
        >>> io = ModelIO()
        >>> io.split({"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)})[1]
        tensor([0., 0.])
        >>> io.select({"logits": torch.ones(1), "past": None})
        tensor([1.])
    """

    def __init__(
        self,
        *,
        output: str | int | Callable[[Any], Tensor] = "auto",
        targets: str | None = "labels",
        call: str = "auto",
        weight: Callable[[Any], float] | None = None,
    ):
        if not (isinstance(output, (str, int)) or callable(output)) or isinstance(output, bool):
            raise TypeError(
                "output must be 'auto', a key, a position or a callable, got "
                f"{type(output).__name__}"
            )
        if targets is not None and not isinstance(targets, str):
            raise TypeError(f"targets must be a key (str) or None, got {type(targets).__name__}")
        if call not in CALLS:
            raise ValueError(f"call must be one of {CALLS}, got {call!r}")
        if weight is not None and not callable(weight):
            raise TypeError(
                f"weight must be callable (batch -> float), got {type(weight).__name__}"
            )
        self.output, self.targets, self.call, self.weight = output, targets, call, weight
        self._kwargs_ok: dict[tuple[int, frozenset], str] = {}

    def __repr__(self) -> str:
        return (
            f"ModelIO(output={self.output!r}, targets={self.targets!r}, call={self.call!r}, "
            f"weight={self.weight!r})"
        )

    # -- batches ----------------------------------------------------------------------
    def is_batch(self, data: object) -> bool:
        """Whether ``data`` is one batch (rather than an iterable of batches): a dict, or a
        pair whose second element is not a tuple or list. A pair of two dicts is two dict
        batches; a batch whose targets are a dict goes in a list, ``[(inputs, targets)]``."""
        if isinstance(data, Mapping):
            return True
        return (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and not isinstance(data[1], (tuple, list))
            and not (isinstance(data[0], Mapping) and isinstance(data[1], Mapping))
        )

    def split(self, batch: object) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a batch, or a clear error."""
        if isinstance(batch, Mapping):
            if self.targets is None:
                raise TypeError(
                    "a batch is a dict, but ModelIO(targets=None) refuses dict batches; "
                    "give (inputs, targets) pairs or name the targets' key"
                )
            if self.targets not in batch:
                raise ValueError(
                    f"a dict batch must hold the targets under {self.targets!r}; it has "
                    f"{list(batch)}: pass io=hesse.ModelIO(targets=<key>)"
                )
            inputs = {k: v for k, v in batch.items() if k != self.targets}
            return inputs, batch[self.targets]
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = (
                f"a {type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list))
                else type(batch).__name__
            )
            raise TypeError(
                "each batch must be a pair (inputs, targets) or a dict holding the targets "
                f"under {self.targets!r}, got {got}"
            )
        return batch[0], batch[1]

    def samples(self, batch: object) -> int:
        """Number of samples in a batch: the leading dimension of its first input tensor."""
        t = first_tensor(self.split(batch)[0])
        if t is None or t.dim() == 0:
            raise TypeError(
                "the inputs of a batch must hold a tensor with a leading batch dimension"
            )
        return int(t.shape[0])

    # -- the forward pass ---------------------------------------------------------------
    def _dict_call(self, model: nn.Module, keys: frozenset) -> str:
        cache = (id(model), keys)
        if cache not in self._kwargs_ok:
            self._kwargs_ok[cache] = _dict_call(model, keys)
        return self._kwargs_ok[cache]

    def forward(
        self, model: nn.Module, state: dict[str, Tensor], inputs: object, tie_weights: bool = True
    ) -> Any:
        """``model(inputs)`` with the parameters and buffers of ``state`` (with
        ``tie_weights=False``, ``state`` names every alias of a tied tensor itself)."""
        call = self.call
        if call == "auto":
            if isinstance(inputs, Mapping):
                call = self._dict_call(model, frozenset(inputs))
            else:
                call = "args"
        if call == "kwargs":
            if not isinstance(inputs, Mapping):
                raise TypeError(
                    f"call='kwargs' needs the inputs as a dict, got {type(inputs).__name__}"
                )
            return functional_call(
                model, state, args=(), kwargs=dict(inputs), tie_weights=tie_weights
            )
        args = tuple(inputs) if call == "args" and isinstance(inputs, (tuple, list)) else (inputs,)
        return functional_call(model, state, args, tie_weights=tie_weights)

    def select(self, out: Any) -> Tensor:
        """The tensor of the model's output ``out`` that the loss sees."""
        sel = self.output
        if callable(sel) and not isinstance(sel, str):
            picked = sel(out)
        elif sel == "auto":
            picked = _auto_output(out)
        elif isinstance(sel, int):
            picked = out[sel]
        elif isinstance(out, Mapping):
            if sel not in out:
                raise KeyError(f"the model's output has no {sel!r}; it has {list(out)}")
            picked = out[sel]
        else:
            picked = getattr(out, sel)
        if not isinstance(picked, Tensor):
            raise TypeError(
                f"ModelIO(output={sel!r}) picked a {type(picked).__name__} from the model's "
                f"output ({type(out).__name__}); the loss and the curvature need a tensor: "
                "pass io=hesse.ModelIO(output=<key, position or callable>)"
            )
        return picked


def _auto_output(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise TypeError(
            f"the model returns a {type(out).__name__} with keys {list(out)} and no 'logits': "
            "say which one the loss takes with io=hesse.ModelIO(output=<key>)"
        )
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def _dict_call(model: nn.Module, keys: frozenset) -> str:
    """``"kwargs"`` if ``model.forward`` accepts ``keys`` as keyword arguments, else
    ``"single"`` if it takes one argument, else a clear error."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "kwargs"
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return "kwargs"
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    if keys <= named:
        return "kwargs"
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) <= 1 and positional:
        return "single"
    raise TypeError(
        f"the inputs are a dict with keys {sorted(keys)}, but {type(model).__name__}.forward"
        f"{sig} neither accepts them as keyword arguments nor takes one argument; pass "
        "io=hesse.ModelIO(call='kwargs' or 'single')"
    )
