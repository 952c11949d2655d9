"""The methods of ``hvp_cost.py`` (which describes the method): each a factory that does
its set-up on a :class:`_models.Problem` and returns the call to time, and
:func:`prepare`, which sets every method up and checks its first product against the
float64 reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import hesse
from _harness import Call
from _models import Problem, hesse_operator, rel_error
from _peers import (
    BACKPACK,
    CURVLINOPS,
    EIGENTHINGS,
    PYHESSIAN,
    backpack_ggnvp,
    backpack_hvp,
    curvlinops_operator,
    eigenthings_operator,
    pyhessian_hessian,
)

TOLERANCE = 1e-4

# -- the methods ---------------------------------------------------------------------------


def gradient(pb: Problem) -> Call:
    return lambda: torch.autograd.grad(pb.loss_fn(pb.model(pb.X), pb.y), pb.params)


def hesse_hvp(mode: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        H = hesse.HessianOperator(pb.model, pb.loss_fn, (pb.X, pb.y), mode=mode)
        return lambda: H @ pb.v

    return factory


def hesse_ggn(pb: Problem) -> Call:
    G = hesse_operator(pb, "GGN")
    return lambda: G @ pb.v


def hesse_linearized(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = hesse_operator(pb, kind).linearize()
        return lambda: op @ pb.v

    return factory


def hesse_linearize_cost(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = hesse_operator(pb, kind)
        return op.linearize

    return factory


def plain_hvp(pb: Problem) -> Call:
    def call() -> Any:
        loss = pb.loss_fn(pb.model(pb.X), pb.y)
        g = torch.autograd.grad(loss, pb.params, create_graph=True)
        return torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list)

    return call


def plain_hvp_cached(pb: Problem) -> Call:
    loss = pb.loss_fn(pb.model(pb.X), pb.y)
    g = torch.autograd.grad(loss, pb.params, create_graph=True)
    return lambda: torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list, retain_graph=True)


def pyhessian_hvp(pb: Problem) -> Call:
    from pyhessian.utils import hessian_vector_product

    hc = pyhessian_hessian(pb.model, pb.loss_fn, (pb.X, pb.y))
    return lambda: hessian_vector_product(hc.gradsH, hc.params, pb.v_list)


def pyhessian_construction(pb: Problem) -> Call:
    return lambda: pyhessian_hessian(pb.model, pb.loss_fn, (pb.X, pb.y))


def curvlinops_op(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = curvlinops_operator(kind, pb.model, pb.loss_fn, pb.params, pb.X, pb.y)
        return lambda: op @ pb.v

    return factory


def eigenthings_op(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = eigenthings_operator(kind, pb.model, pb.loss_fn, pb.X, pb.y)
        return lambda: op.matvec(pb.v)

    return factory


def backpack_op(kind: str) -> Callable[[Problem], Call]:
    product = backpack_hvp if kind == "H" else backpack_ggnvp
    return lambda pb: lambda: product(pb.model, pb.loss_fn, pb.X, pb.y, pb.v_list)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "grad", "H", "GGN" (checked against the reference) or "setup"
    factory: Callable[[Problem], Call]
    package: str | None = None  # the peer's distribution, if any


RoR, FoR = "reverse-over-reverse", "forward-over-reverse"
PYH, CURV, EIG, BP = PYHESSIAN, CURVLINOPS, EIGENTHINGS, BACKPACK
METHODS = [
    Method("gradient", "gradient (forward + backward)", "grad", gradient),
    Method("hesse-ror", "hesse H @ v, rev-over-rev", "H", hesse_hvp(RoR)),
    Method("hesse-for", "hesse H @ v, fwd-over-rev", "H", hesse_hvp(FoR)),
    Method("hesse-lin", "hesse H.linearize() @ v", "H", hesse_linearized("H")),
    Method("plain", "double backward", "H", plain_hvp),
    Method("plain-cached", "double backward, cached grad graph", "H", plain_hvp_cached),
    Method("pyhessian", "PyHessian hvp, cached grad graph", "H", pyhessian_hvp, PYH),
    Method("curvlinops-h", "curvlinops Hessian @ v", "H", curvlinops_op("H"), CURV),
    Method("eigenthings-h", "eigenthings Hessian matvec", "H", eigenthings_op("H"), EIG),
    Method("backpack-h", "BackPACK hvp", "H", backpack_op("H"), BP),
    Method("hesse-ggn", "hesse G @ v", "GGN", hesse_ggn),
    Method("hesse-ggn-lin", "hesse G.linearize() @ v", "GGN", hesse_linearized("GGN")),
    Method("curvlinops-ggn", "curvlinops GGN @ v", "GGN", curvlinops_op("GGN"), CURV),
    Method("eigenthings-ggn", "eigenthings GGN matvec", "GGN", eigenthings_op("GGN"), EIG),
    Method("backpack-ggn", "BackPACK ggnvp", "GGN", backpack_op("GGN"), BP),
    Method("hesse-lin-cost", "hesse H.linearize() itself", "setup", hesse_linearize_cost("H")),
    Method(
        "hesse-ggn-lin-cost", "hesse G.linearize() itself", "setup", hesse_linearize_cost("GGN")
    ),
    Method("pyhessian-ctor", "PyHessian construction", "setup", pyhessian_construction, PYH),
]
BY_KEY = {m.key: m for m in METHODS}


# -- set-up and correctness -----------------------------------------------------------------


def check_method(m: Method, pb: Problem, refs: dict[str, Tensor]) -> tuple[Call | None, dict]:
    """Set one method up and check its first product. Returns the call to time (None if it
    is missing, fails or is wrong) and its row of results; warnings go into the note (a
    fallback to another algorithm, say)."""
    row = {"key": m.key, "label": m.label, "kind": m.kind, "package": m.package}
    row.update(status="ok", note="", rel_error=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = m.factory(pb)
            out = call()
        except ImportError as e:
            return None, {**row, "status": "skipped", "note": f"not installed ({e.name or e})"}
        except Exception as e:  # a peer's API may have moved: report, do not crash
            return None, {**row, "status": "failed", "note": f"{type(e).__name__}: {e}"[:200]}
    messages = dict.fromkeys(
        str(w.message).splitlines()[0]
        for w in caught
        if m.package is None and not issubclass(w.category, DeprecationWarning)
    )
    row["note"] = "; ".join(f"warned: {text}" for text in messages)[:300]
    if m.kind in refs:
        row["rel_error"] = err = rel_error(out, refs[m.kind])
        if not err < TOLERANCE:  # also catches nan
            return None, {**row, "status": "wrong", "note": f"rel. error {err:.1e} > {TOLERANCE:g}"}
    return call, row


def prepare(pb: Problem, refs: dict[str, Tensor]) -> tuple[dict[str, Call], dict[str, dict]]:
    """Set up and check every method: the calls to time, and a row of results per method."""
    calls: dict[str, Call] = {}
    rows: dict[str, dict] = {}
    for m in METHODS:
        call, rows[m.key] = check_method(m, pb, refs)
        if call is not None:
            calls[m.key] = call
    return calls, rows
