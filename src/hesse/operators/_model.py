"""Curvature of a model's loss over data, as lazy operators."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from hesse._core import all_finite, check_finite
from hesse._core._checks import check_choice, check_generator, check_int
from hesse._core._progress import report
from hesse.func._engine import hvp_product, jmj_product
from hesse.func._io import ModelIO
from hesse.func._model import _DEFAULT_IO, Batch, ModelLoss
from hesse.func._output import FISHER_KINDS, OutputCurvature, fisher_mm
from hesse.func._tensor import DEFAULT_HVP_MODE, HVP_MODES
from hesse.operators._base import NONFINITE_LOSS, CurvatureOperator
from hesse.operators._memory import GraphMeter, parse_budget, resolve_budget

Columns = tuple[Tensor, ...]  # one tensor (k, *param.shape) per parameter
BatchProduct = Callable[[Columns], Columns]


def _is_single_batch(data: object, io: ModelIO | None = None) -> bool:
    return (io or _DEFAULT_IO).is_batch(data)


def _describe(x: object) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_data(data: object, empty_ok: bool = False, io: ModelIO | None = None) -> Iterable[Batch]:
    if _is_single_batch(data, io):
        return [data]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be one batch (inputs, targets) or a dict holding the targets, or an "
            f"iterable of such batches (a list, a DataLoader), got {_describe(data)}"
        )
    if iter(data) is data:
        raise TypeError(
            "data must be re-iterable (a list or a DataLoader): each product goes over it "
            f"again, but a {type(data).__name__} is exhausted after one pass; use list(data)"
        )
    if hasattr(data, "__len__") and len(data) == 0 and not empty_ok:
        raise ValueError("data is empty: expected at least one batch (inputs, targets)")
    return data


class ModelCurvature(CurvatureOperator):
    """Base of the curvature operators of ``loss_fn(model(inputs), targets)`` over data.

    The operator is the curvature of the mean loss over all samples of ``data`` (batches
    weighted by :meth:`ModelLoss.weight`: their number of samples, or of counted tokens for
    a loss that averages over tokens), or of the sum over batches when
    ``loss_fn.reduction == "sum"``.
    Subclasses implement ``_batch_product(params, batch, index)``, which returns the
    product for one batch as a function of the columns.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Any,
        params: Sequence[Tensor | str] | None = None,
        io: ModelIO | None = None,
        memory_budget: object = None,
    ):
        self.fn = ModelLoss(model, loss_fn, params, io, second_order=self._second_order)
        #: Bytes of graphs :meth:`linearize` may keep (None: HESSE_MEMORY_BUDGET or the
        #: default, see :mod:`hesse.operators._memory`); checked now, resolved then.
        self.memory_budget = None if memory_budget is None else parse_budget(memory_budget)
        self._losses: list[Tensor] = []  # the batches' losses of the latest product
        super().__init__(self.fn.size, self.fn.space.dtype, self.fn.space.device)
        self.data = _check_data(data, self._empty_ok, self.fn.io)
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn must reduce to a scalar (reduction 'mean' or 'sum'), got {reduction!r}"
            )
        self.reduction = reduction

    @property
    def model(self) -> nn.Module:
        return self.fn.model

    @property
    def space(self):
        return self.fn.space

    def _batch_product(
        self, params: Columns, batch: Batch, index: int, reuse: bool
    ) -> BatchProduct:
        """The product for one batch as a function of the columns. The work that does not
        depend on the columns (forward pass, graphs) is done here, eagerly; with ``reuse``
        the subclass moves as much work as it can here, since the closure will be applied
        many times."""
        raise NotImplementedError

    def _products(
        self, reuse: bool = False, start: int = 0
    ) -> Iterable[tuple[BatchProduct, float]]:
        """Each batch's product (from batch ``start`` on) and its weight; the batches
        before ``start`` are read (an iterable has no other way to reach the rest) but not
        computed."""
        params = self.fn.params()
        found = start > 0
        _start_pass(self.data, start)
        for index, batch in enumerate(self.data):
            if index < start:
                continue
            report("batch")
            n = self.fn.weight(batch)
            if n == 0:  # a batch without samples adds nothing (a mean over it is NaN)
                continue
            found = True
            yield self._batch_product(params, batch, index, reuse), n
        if not found and not self._empty_ok:
            raise ValueError("data is empty: expected at least one batch (inputs, targets)")

    #: Whether this process may hold no batch (a data-parallel rank with an empty shard).
    _empty_ok = False
    #: Whether forward passes run in :func:`hesse.func.second_order` (their graphs are
    #: differentiated twice).
    _second_order = True

    def _local_sum(
        self, parts: Iterable[tuple[BatchProduct, int]], V: Tensor
    ) -> tuple[Tensor, int, bool]:
        """The batches' products summed, weighted by their sizes for a mean loss, and the
        number of samples. A single batch's product is returned as it is, unweighted (its
        mean is the operator; no round trip through ``* n / n``), and the flag says whether
        the weights were applied. ``flatten_columns`` returns fresh tensors, so the sum is
        accumulated in place; batches are streamed, one graph at a time. Half-precision
        products are summed in float32 (a product times a sample count overflows float16)."""
        space = self.space
        cols = space.unflatten_columns(V)
        mean = self.reduction == "mean"
        acc = torch.float32 if V.dtype in (torch.float16, torch.bfloat16) else V.dtype
        total: Tensor | None = None
        n_total = count = 0
        first_weight = 1.0
        for product, n in parts:
            out = space.flatten_columns(product(cols)).to(acc)
            weight = float(n) if mean else 1.0
            if count == 0:
                total, first_weight = out, weight
            elif count == 1:
                total = total.mul_(first_weight).add_(out, alpha=weight)
            else:
                total.add_(out, alpha=weight)
            n_total += n
            count += 1
        if total is None:  # no batch here (a data-parallel rank with an empty shard)
            total = torch.zeros(V.shape, dtype=acc, device=V.device)
        return total, n_total, count > 1 or not mean

    def _combine(self, parts: Iterable[tuple[BatchProduct, int]], V: Tensor) -> Tensor:
        """The operator's product: the size-weighted sum of the batches' products divided
        by the number of samples (for a mean loss). Data-parallel subclasses
        (:mod:`hesse.distributed`) reduce across processes here."""
        total, n_total, weighted = self._local_sum(parts, V)
        if self.reduction == "mean" and weighted:
            total = total / n_total
        return total.to(V.dtype)

    def _matmat(self, V: Tensor) -> Tensor:
        self._losses = []  # the base class checks them with the product
        return self._combine(self._products(), V)

    def _record(self, loss: Tensor) -> Tensor:
        """Keep a batch's loss value, to be checked finite together with the product."""
        self._losses.append(loss.detach())
        return loss

    def _losses_seen(self) -> list[Tensor]:
        losses, self._losses = self._losses, []
        return losses

    def _check_losses(self) -> None:
        """Raise now if a loss behind the products built so far is not finite (one host
        sync): for work done once (``linearize()``) or before a collective."""
        losses = self._losses_seen()
        if losses and not all_finite(*losses):
            for loss in losses:
                check_finite(loss, NONFINITE_LOSS)

    def linearize(self, memory_budget: object = None) -> LinearizedCurvature:
        """Do the expensive part of the batches' products once, for many products at this
        point (CG, Lanczos): a :class:`LinearizedCurvature` that keeps the graphs of as many
        batches as ``memory_budget`` allows (bytes, or a string such as ``"256M"``; by
        default the operator's ``memory_budget``, then ``HESSE_MEMORY_BUDGET``, then half
        the device's free memory), recomputes the others at each product, and refuses
        products once the parameters have changed."""
        return LinearizedCurvature(self, memory_budget)


def _start_pass(data: object, start: int = 0) -> None:
    """Report a pass over ``data`` (its length, when it has one) to progress listeners."""
    report("pass", max(len(data) - start, 0) if hasattr(data, "__len__") else 0)


def _shuffles(data: object) -> bool:
    """Whether ``data`` is a DataLoader whose batches come in a random order."""
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(data, DataLoader):
        return False
    sampler = getattr(data.batch_sampler, "sampler", data.sampler)
    return isinstance(sampler, RandomSampler)


class LinearizedCurvature(CurvatureOperator):
    """A :class:`ModelCurvature` frozen at the current parameters. The graphs of the first
    batches, as many as fit in the memory budget (:mod:`hesse.operators._memory`), are
    built once and reused by every product; the batches after them are recomputed at each
    product (a forward and a backward pass each, as the operator itself does), so memory
    does not grow with the data. Products refuse to run once the parameters have changed.

    Attributes:
        memory_budget: the budget in bytes.
        cached_batches, cached_bytes: the batches whose graphs are kept, and the bytes
            their saved tensors and gradient vectors take.
        recomputed: whether some batches are recomputed at each product.
    """

    def __init__(self, op: ModelCurvature, memory_budget: object = None):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.symmetric, self.psd, self.chunk_size = op.symmetric, op.psd, op.chunk_size
        self.memory_budget = resolve_budget(
            memory_budget if memory_budget is not None else op.memory_budget, op.device
        )
        self._versions = op.fn.versions()
        op._losses = []
        self._parts, self._rest_from, self.cached_bytes = self._cache(op)
        op._check_losses()  # the cached graphs are built once: their losses are checked once
        if self._rest_from is not None and _shuffles(op.data):
            raise ValueError(
                "the data is a DataLoader that shuffles, and its graphs do not all fit in "
                f"the memory budget ({self.memory_budget:,} bytes): a partly cached operator "
                "needs the same batches in the same order at every product; give a "
                "DataLoader with shuffle=False, or a larger memory_budget"
            )

    @property
    def cached_batches(self) -> int:
        return len(self._parts)

    @property
    def recomputed(self) -> bool:
        return self._rest_from is not None

    def _cache(self, op: ModelCurvature) -> tuple[list, int | None, int]:
        """Build the graphs of the first batches while they fit: ``(parts, index of the
        first batch to recompute or None, bytes kept)``.

        The budget bounds the graphs held at once: where some batches must be recomputed
        at each product, the cache leaves room for the largest graph measured, the one a
        recomputed batch builds while the cached ones are alive (without that room, peak
        memory was the budget plus one batch's graph and the allocator's slack for it); and
        a batch is built for the cache only where, judged by the largest graph so far, its
        graph and that room both fit."""
        params = op.fn.params()
        meter = GraphMeter(exclude=params)
        # the gradient-like vectors a cached product keeps (J^T u, the gradient), per batch
        vectors = op.space.size * torch.empty((), dtype=op.dtype).element_size()
        parts: list[tuple[BatchProduct, float]] = []
        cost: list[tuple[int, int]] = []  # (index of the batch, bytes) of each cached part
        kept, found, largest = 0, False, 0
        _start_pass(op.data)
        for index, batch in enumerate(op.data):
            n = op.fn.weight(batch)
            if n == 0:  # as ModelCurvature._products: a batch without samples adds nothing
                continue
            found = True
            # Not even this batch's vectors fit, or (judged by the largest graph so far)
            # not its graph and room for a recomputed one: building it would already
            # pass the budget.
            if kept + vectors + 2 * largest > self.memory_budget:
                return self._make_room(parts, cost, index, kept, largest)
            with meter.measure():
                part = op._batch_product(params, batch, index, True)
            report("batch")
            largest = max(largest, meter.bytes)
            if kept + meter.bytes + vectors > self.memory_budget:
                del part  # dropped: recomputed from here on
                return self._make_room(parts, cost, index, kept, largest)
            parts.append((part, n))
            cost.append((index, meter.bytes + vectors))
            kept += meter.bytes + vectors
        if not found and not op._empty_ok:
            raise ValueError("data is empty: expected at least one batch (inputs, targets)")
        return parts, None, kept

    def _make_room(self, parts: list, cost: list, rest: int, kept: int, largest: int):
        """Drop the last cached graphs until the largest graph fits beside the rest: the
        dropped batches are recomputed too (``rest`` moves back to the first of them)."""
        while parts and kept + largest > self.memory_budget:
            parts.pop()
            rest, size = cost.pop()
            kept -= size
        return parts, rest, kept

    def _matmat(self, V: Tensor) -> Tensor:
        self.op._losses = []  # the recomputed batches' losses, checked with the product
        return self.op._combine(self._checked_parts(), V)

    def _losses_seen(self) -> list[Tensor]:
        return self.op._losses_seen()

    @property
    def product_rtol(self) -> float:
        return self.op.product_rtol

    def _checked_parts(self) -> Iterable[tuple[BatchProduct, float]]:
        # Checked as the parts are read, inside _combine: a data-parallel operator then
        # carries the error to the other ranks instead of leaving them waiting.
        if self.op.fn.versions() != self._versions:
            raise RuntimeError(
                "the parameters changed in place since linearize(); the cached graphs are "
                "stale: call linearize() again at the new point"
            )
        yield from self._parts
        if self._rest_from is not None:
            yield from self.op._products(start=self._rest_from)

    def synchronize_generator(self, generator: torch.Generator) -> torch.Generator:
        return self.op.synchronize_generator(generator)


class HessianOperator(ModelCurvature):
    r"""The Hessian of the loss with respect to the parameters, :math:`\nabla^2_\theta L`.

    Args:
        model: the network; its mode, parameters and buffers are never changed.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar (reduction ``"mean"`` or ``"sum"``);
            ``outputs`` is the output tensor ``io`` selects (a Hugging Face model's logits).
        data: one batch ``(inputs, targets)`` or a dict holding the targets under
            ``"labels"``, or a re-iterable of batches (a list, a DataLoader).
        params: parameters (tensors of the model, or names) spanning the flat vector; by
            default all that require grad (frozen ones are not unknowns). A subset gives a
            diagonal block of the Hessian. Tied parameters count once.
        mode: ``"reverse-over-reverse"`` or ``"forward-over-reverse"``; by default
            :data:`hesse.func.DEFAULT_HVP_MODE`.
        io: a :class:`hesse.ModelIO` for models and batches the defaults do not cover.
        memory_budget: bytes (or ``"256M"``) of graphs :meth:`linearize` may keep; the
            batches beyond it are recomputed at each product. Default: the environment
            variable ``HESSE_MEMORY_BUDGET``, else half the device's free memory.

    Attention and RNN kernels without double backward are replaced for hesse's own forward
    passes (:func:`hesse.func.second_order`); the model needs no change.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> data = (torch.randn(8, 3), torch.randn(8, 1))
        >>> H = HessianOperator(model, torch.nn.MSELoss(), data)
        >>> H.shape
        (4, 4)
        >>> v = torch.ones(4)
        >>> torch.allclose(H @ v, H.to_dense() @ v)
        True
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        mode: str | None = None,
        io=None,
        memory_budget=None,
    ):
        super().__init__(model, loss_fn, data, params, io, memory_budget)
        self.mode = DEFAULT_HVP_MODE if mode is None else check_choice(mode, "mode", HVP_MODES)
        self._forward_failed = False
        self.symmetric, self.psd = True, False

    def _batch_product(
        self, params: Columns, batch: Batch, index: int, reuse: bool
    ) -> BatchProduct:
        g = grad(lambda ps: self.fn.loss(ps, batch))
        if self.mode == "forward-over-reverse" and not reuse and not self._forward_failed:
            forward = vmap(lambda t: jvp(g, (params,), (t,))[1])
            with torch.no_grad():  # the loss is inside the transforms: one more forward pass
                self._record(self.fn.loss(params, batch))

            def product(cols: Columns) -> Columns:
                if not self._forward_failed:
                    try:
                        with torch.enable_grad():
                            return forward(cols)
                    except RuntimeError as err:
                        # Some ops lack (working) forward-mode derivatives of their backward,
                        # e.g. mse_loss in torch 2.x ("ZeroTensors are immutable").
                        self._forward_failed = True
                        warnings.warn(
                            f"forward-over-reverse failed ({err}); HessianOperator falls "
                            "back to reverse-over-reverse for this model",
                            stacklevel=4,
                        )
                return self._batch_product(params, batch, index, reuse)(cols)

            return product
        # reverse-over-reverse: the gradient's graph is built here, each product is one
        # backward pass through it.
        return hvp_product(lambda ps: self._record(self.fn.loss(ps, batch)), params, reuse)


class _OutputSpaceCurvature(ModelCurvature):
    """Curvatures of the form ``J^T M J`` with ``M`` a matrix in the space of the outputs."""

    psd = True

    def __init__(
        self, model, loss_fn, data, params=None, io=None, likelihood=None, memory_budget=None
    ):
        super().__init__(model, loss_fn, data, params, io, memory_budget)
        self.curvature = OutputCurvature(loss_fn, likelihood)

    def _out_mm(self, targets: Any, index: int) -> Callable[[Tensor], Callable]:
        raise NotImplementedError

    def _batch_product(
        self, params: Columns, batch: Batch, index: int, reuse: bool
    ) -> BatchProduct:
        inputs, targets = self.fn.split(batch)
        out_mm = self._out_mm(targets, index)

        def make_out_mm(out: Tensor) -> Callable[[Tensor], Tensor]:
            self.curvature.check_targets(out, targets)  # before the loss reads them
            self._record(self.fn.loss_fn(out, targets))  # cheap: on the outputs
            return out_mm(out)

        return jmj_product(lambda ps: self.fn.outputs(ps, inputs), params, make_out_mm, reuse)


class GGNOperator(_OutputSpaceCurvature):
    r"""The generalised Gauss-Newton matrix :math:`G = J^\top \nabla^2_o \ell\, J`.

    :math:`J` is the Jacobian of the model's outputs with respect to the parameters and
    :math:`\nabla^2_o \ell` the Hessian of the loss with respect to the outputs (closed form
    for ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``; autograd for any other
    loss). Positive semidefinite when the loss is convex in the outputs. Arguments as
    :class:`HessianOperator`.
    """

    def _out_mm(self, targets: Any, index: int) -> Callable[[Tensor], Callable]:
        return lambda out: lambda U: self.curvature.hessian_mm(out, targets, U)


class FisherOperator(_OutputSpaceCurvature):
    r"""The Fisher information matrix of the likelihood behind the loss.

    ``kind="empirical"``: :math:`c \sum_i \nabla \mathrm{NLL}_i \nabla \mathrm{NLL}_i^\top`
    with the gradients at the true targets (for an unknown loss, the loss of each sample
    is taken as its NLL).
    ``kind="mc"``: the same with ``mc_samples`` targets per sample drawn from the model's
    predictive distribution (categorical for cross-entropy, Bernoulli for BCE, Gaussian of
    variance 1/2 for MSE); its expectation is the GGN. The draws are fixed when the
    operator is made (seeded from ``generator``), so products are deterministic and the
    operator is linear.

    ``likelihood``: for a loss written as a function, the likelihood it is the negative
    log of, ``"categorical"`` (classes along the last dimension; targets outside
    ``[0, classes)``, such as ``-100``, are ignored), ``"gaussian"`` or ``"bernoulli"``;
    ``kind="mc"`` needs it. Sequence outputs work with either form, e.g.
    ``FisherOperator(model, lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()),
    data, kind="mc", likelihood="categorical")``.
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        kind: str = "empirical",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        likelihood: str | None = None,
        io=None,
        memory_budget=None,
    ):
        super().__init__(model, loss_fn, data, params, io, likelihood, memory_budget)
        kind = check_choice(kind, "kind", FISHER_KINDS)
        mc_samples = check_int(mc_samples, "mc_samples", 1)
        check_generator(generator)
        self.curvature.check_fisher(kind)
        self.kind, self.mc_samples = kind, mc_samples
        # One seed drawn now; batch i then draws from seed + i, the same at every product.
        gen_device = generator.device if generator is not None else "cpu"
        self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))

    def _out_mm(self, targets: Any, index: int) -> Callable[[Tensor], Callable]:
        def make(out: Tensor) -> Callable[[Tensor], Tensor]:
            gen = None
            if self.kind == "mc":
                gen = torch.Generator(device=out.device)
                gen.manual_seed(self._seed + index)
            S, c = self.curvature.fisher_factors(out, targets, self.kind, gen, self.mc_samples)
            return lambda U: fisher_mm(S, c, U)

        return make
