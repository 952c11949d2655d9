"""The curvature peers, in one place: how ``hvp_cost.py``, ``eigen.py`` and
``memory_budget.py`` call PyHessian, curvlinops, hessian-eigenthings and BackPACK.

Each is built the way that is fairest to it (curvlinops without its determinism check and
with the number of samples given, so that it makes no extra passes over the data), with
wrappers that count their products (:class:`Counter`). The solver peers (scipy,
``torch.optim.LBFGS``, pytorch-minimize, scikit-learn) are in ``_solvers.py``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import hesse
from _models import Problem, flat

PYHESSIAN = "pyhessian"
CURVLINOPS = "curvlinops-for-pytorch"
EIGENTHINGS = "hessian-eigenthings"
BACKPACK = "backpack-for-pytorch"
CURVATURE_PEERS = (PYHESSIAN, CURVLINOPS, EIGENTHINGS, BACKPACK)

# The backward with create_graph=True inside PyHessian warns about a reference cycle;
# BackPACK's hooks warn on every pass.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class Counter:
    """Products counted by a wrapper; with ``record``, the Rayleigh quotient of each."""

    record: bool = False
    products: int = 0
    rayleigh: list[float] = field(default_factory=list)

    def add(self, v: Any, hv: Any, columns: int = 1) -> None:
        self.products += columns
        if self.record:
            v, hv = flat(v).double(), flat(hv).double()
            self.rayleigh.append(float(v @ hv / (v @ v)))


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` inside the block (to count or spy on a library's calls)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def pyhessian_hessian(model: nn.Module, loss_fn: Any, data: Any = None, dataloader: Any = None):
    """PyHessian's ``hessian`` on one batch ``data=(X, y)`` or a ``dataloader``. Its
    constructor runs a backward that adds into ``.grad``: cleared first. (It also switches
    the model to eval mode.)"""
    from pyhessian import hessian as PyHessian

    model.zero_grad(set_to_none=True)
    cuda = next(model.parameters()).is_cuda
    return PyHessian(model, loss_fn, data=data, dataloader=dataloader, cuda=cuda)


@contextlib.contextmanager
def pyhessian_session(model: nn.Module, loss_fn: Any, data: Any, seed: int) -> Iterator[Any]:
    """PyHessian's ``hessian`` on a batch, its random vectors (torch's global generator)
    seeded; the gradients it leaves and its switch to eval mode are undone on exit."""
    training = model.training
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    try:
        yield pyhessian_hessian(model, loss_fn, data)
    finally:
        model.zero_grad(set_to_none=True)  # frees the graph of its gradient
        model.train(training)


@contextlib.contextmanager
def pyhessian_counted(counter: Counter) -> Iterator[None]:
    """Count PyHessian's products: its ``hessian`` class calls the module-level
    ``hessian_vector_product`` of the module ``pyhessian.hessian`` (which the package's
    ``hessian`` attribute, the class, hides)."""
    import pyhessian  # noqa: F401  (loads pyhessian.hessian)

    ph = sys.modules["pyhessian.hessian"]
    fn = ph.hessian_vector_product

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        hv = fn(gradsH, params, v)
        counter.add(v, hv)
        return hv

    with patched(ph, "hessian_vector_product", counted):
        yield


def curvlinops_operator(
    kind: str, model: nn.Module, loss_fn: Any, params: list[Tensor], X: Tensor, y: Tensor
) -> Any:
    """curvlinops' ``HessianLinearOperator`` (``kind="H"``) or ``GGNLinearOperator`` on one
    batch."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    cls = HessianLinearOperator if kind == "H" else GGNLinearOperator
    return cls(
        model,
        loss_fn,
        params,
        [(X, y)],
        check_deterministic=False,  # the default runs 2 passes and 2 products to check
        num_data=X.shape[0],  # the default runs one pass over the data to count
    )


def count_curvlinops(op: Any, counter: Counter, size: int) -> Any:
    """Count the columns that reach the operator's ``_matmat`` (``size``: the number of
    entries of the first parameter; each tensor of ``X`` has a trailing axis of columns)."""
    fn = op._matmat

    def counted(X: list[Tensor]) -> list[Tensor]:
        counter.add(None, None, X[0].numel() // size)
        return fn(X)

    op._matmat = counted  # __matmul__ (and so to_scipy()) goes through it
    return op


def eigenthings_operator(kind: str, model: nn.Module, loss_fn: Any, X: Tensor, y: Tensor) -> Any:
    """hessian-eigenthings' ``HessianOperator`` (``kind="H"``) or ``GGNOperator``."""
    import hessian_eigenthings as he

    data = [(X, y)]
    if kind == "H":
        return he.HessianOperator(model, data, he.supervised_loss(loss_fn))
    return he.GGNOperator(model, data, he.supervised_forward, he.supervised_loss_of_output(loss_fn))


def count_eigenthings(op: Any, counter: Counter) -> Any:
    fn = op.matvec

    def counted(v: Tensor) -> Tensor:
        hv = fn(v)
        counter.add(v, hv)
        return hv

    op.matvec = counted  # the algorithms call operator.matvec
    return op


def curvlinops_hessian(pb: Problem, counter: Counter) -> Any:
    """curvlinops' Hessian of a :class:`_models.Problem`, its products counted."""
    op = curvlinops_operator("H", pb.model, pb.loss_fn, pb.params, pb.X, pb.y)
    return count_curvlinops(op, counter, pb.params[0].numel())


def eigenthings_hessian(pb: Problem, counter: Counter) -> Any:
    """hessian-eigenthings' Hessian of a :class:`_models.Problem`, its products counted."""
    return count_eigenthings(eigenthings_operator("H", pb.model, pb.loss_fn, pb.X, pb.y), counter)


def hesse_counted(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()`` with hesse's linearised products counted, column by column (to check
    the count hesse reports)."""
    counter = Counter()
    fn = hesse.LinearizedCurvature._matmat

    def counted(self: Any, V: Tensor) -> Tensor:
        counter.add(None, None, V.shape[1])
        return fn(self, V)

    with patched(hesse.LinearizedCurvature, "_matmat", counted):
        result = call()
    return result, counter.products


def backpack_hvp(model: nn.Module, loss_fn: Any, X: Tensor, y: Tensor, v: list[Tensor]) -> Any:
    """BackPACK's Hessian-vector product, forward pass included."""
    from backpack.hessianfree.hvp import hessian_vector_product

    params = [p for p in model.parameters() if p.requires_grad]
    return hessian_vector_product(loss_fn(model(X), y), params, v)


def backpack_ggnvp(model: nn.Module, loss_fn: Any, X: Tensor, y: Tensor, v: list[Tensor]) -> Any:
    """BackPACK's GGN-vector product, forward pass included."""
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X)
    return ggn_vector_product_from_plist(loss_fn(out, y), out, params, v)


def backpack_diag_hessian(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The exact diagonal of the Hessian by BackPACK's ``DiagHessian`` (on copies)."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model, loss_fn = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    loss = loss_fn(model(X), y)
    with backpack(DiagHessian()):
        loss.backward()
    return torch.cat([p.diag_h.reshape(-1) for p in model.parameters()])
