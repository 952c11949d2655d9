"""The methods of the top-eigenvalue question of ``eigen.py`` (which describes the
method): each a function ``(pb, seed, setting, record) -> EigRun``, and
:data:`EIG_METHODS`, each with its default setting and, for the peers tuned with hindsight,
its ``ladder`` of one parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import hesse
from _models import Problem, hesse_operator
from _peers import (
    CURVLINOPS,
    EIGENTHINGS,
    PYHESSIAN,
    Counter,
    curvlinops_hessian,
    eigenthings_hessian,
    pyhessian_counted,
    pyhessian_session,
)

PYH, CURV, EIG = PYHESSIAN, CURVLINOPS, EIGENTHINGS


# -- methods --------------------------------------------------------------------------


@dataclass
class EigRun:
    estimate: float
    products: int
    residual: float | None = None  # reported ||H y - theta y|| / |theta|, where there is one
    status: str = ""
    rayleigh: list[float] = field(default_factory=list)  # per product, when recorded


EigFn = Callable[[Problem, int, dict, bool], EigRun]


def hesse_eig(pb: Problem, seed: int, setting: dict, record: bool) -> EigRun:
    r = hesse.eigenvalues(hesse_operator(pb), k=1, seed=seed, **setting)
    theta = float(r.eigenvalues[0])
    return EigRun(theta, r.matvecs, float(r.residuals[0]) / abs(theta), str(r.status))


def pyhessian_eig(pb: Problem, seed: int, setting: dict, record: bool) -> EigRun:
    counter = Counter(record)
    with (
        pyhessian_counted(counter),
        pyhessian_session(pb.model, pb.loss_fn, (pb.X, pb.y), seed) as hc,
    ):
        values, _ = hc.eigenvalues(top_n=1, **setting)
    return EigRun(float(values[0]), counter.products, rayleigh=counter.rayleigh)


def eigenthings_power(pb: Problem, seed: int, setting: dict, record: bool) -> EigRun:
    import hessian_eigenthings as he

    counter = Counter(record)
    op = eigenthings_hessian(pb, counter)
    lam, _, res, iters, converged = he.power_iteration_one(op, seed=seed, **setting)
    if iters != counter.products:
        raise RuntimeError(f"eigenthings reports {iters} products, counted {counter.products}")
    status = "converged" if converged else "max_iterations"
    return EigRun(lam, counter.products, res / abs(lam), status, counter.rayleigh)


def eigenthings_lanczos(pb: Problem, seed: int, setting: dict, record: bool) -> EigRun:
    import hessian_eigenthings as he

    counter = Counter()
    r = he.lanczos(eigenthings_hessian(pb, counter), seed=seed, **setting)
    theta = float(r.eigenvalues[0])
    status = "converged" if bool(r.converged[0]) else "not converged"
    return EigRun(theta, counter.products, float(r.residuals[0]) / abs(theta), status)


def eigsh_curvlinops(pb: Problem, seed: int, setting: dict, record: bool) -> EigRun:
    from scipy.sparse.linalg import eigsh

    counter = Counter()
    op = curvlinops_hessian(pb, counter).to_scipy()
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    w = eigsh(op, k=1, v0=v0, return_eigenvectors=False, **setting)
    return EigRun(float(w[0]), counter.products)


@dataclass(frozen=True)
class EigMethod:
    key: str
    label: str
    fn: EigFn
    setting: dict
    package: str | None = None
    ladder: tuple[str, list] | None = None  # (parameter, values from cheap to costly)


EIG_METHODS = [
    EigMethod("hesse", "hesse.eigenvalues", hesse_eig, {"tol": 1e-3}),
    EigMethod(
        "pyhessian-default",
        "PyHessian power",
        pyhessian_eig,
        {"maxIter": 100, "tol": 1e-3},
        PYH,
    ),
    EigMethod(
        "pyhessian-tuned",
        "PyHessian power",
        pyhessian_eig,
        {"maxIter": 1000},
        PYH,
        ("tol", [1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]),
    ),
    EigMethod(
        "eigenthings-power-default",
        "eigenthings power",
        eigenthings_power,
        {"max_iter": 100, "tol": 1e-4},
        EIG,
    ),
    EigMethod(
        "eigenthings-power-tuned",
        "eigenthings power",
        eigenthings_power,
        {"max_iter": 1000},
        EIG,
        ("tol", [1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 3e-4, 1e-4]),
    ),
    EigMethod(
        "eigenthings-lanczos-default",
        "eigenthings Lanczos",
        eigenthings_lanczos,
        {"k": 1},  # then max_iter = 2k, which="LM"
        EIG,
    ),
    EigMethod(
        "eigenthings-lanczos-tuned",
        "eigenthings Lanczos",
        eigenthings_lanczos,
        {"k": 1, "which": "LA", "reorthogonalize": True},
        EIG,
        ("max_iter", list(range(2, 81))),
    ),
    EigMethod(
        "eigsh-default",
        "eigsh on curvlinops",
        eigsh_curvlinops,
        {"which": "LA"},  # tol=0: machine precision
        CURV,
    ),
    EigMethod(
        "eigsh-tuned",
        "eigsh on curvlinops",
        eigsh_curvlinops,
        {"which": "LA"},
        CURV,
        ("tol", [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6]),
    ),
]
