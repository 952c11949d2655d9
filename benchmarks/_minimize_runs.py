"""One solver on one test function from one start, counted on equal terms (the runs of
``minimize_profile.py``, which describes the method).

:class:`Counter` wraps the objective: one call is one evaluation; it records the first
evaluation that meets the Moré-Wild test (and the products counted until then) and ends the
run past the budget (:class:`BudgetSpent`) or the deadline (``RunTimeout``). :func:`run_one`
runs a solver on an :class:`Instance` and returns its record; :func:`profile_task` runs
every solver on one instance (in a worker process with ``--jobs``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import hesse
from _solvers import (
    RunTimeout,
    ScipyObjective,
    scipy_minimize,
    time_limit,
    torch_lbfgs,
    torchmin_minimize,
)
from hesse._minimize import METHODS as HESSE_METHOD_NAMES
from hesse.problems import FUNCTIONS, ClassicFunction

MW_TAU = 1e-7  # the Moré-Wild test's tolerance
GRAD_RTOL = 1e-12  # stopping tolerance on the gradient, relative to the start's
EPS = float(np.finfo(float).eps)


class BudgetSpent(BaseException):
    """The counter refuses the evaluation after the budget. A BaseException, so that no
    solver's ``except Exception`` (or ``except RuntimeError``) swallows it."""


@dataclass
class Counter:
    """Wraps ``fun``: counts calls, records the first call that meets the Moré-Wild test
    (and the products counted until then), and ends the run past the budget or deadline."""

    fun: Callable[[Tensor], Tensor]
    target: float
    budget: int
    deadline: float
    nfev: int = 0
    nhvp: int = 0
    nhev: int = 0
    solved_at: int | None = None
    nhvp_at_solve: int | None = None
    nhev_at_solve: int | None = None
    best_f: float = math.inf

    def __call__(self, x: Tensor) -> Tensor:
        if self.nfev >= self.budget:
            raise BudgetSpent
        if time.perf_counter() > self.deadline:
            raise RunTimeout
        self.nfev += 1
        f = self.fun(x)
        v = float(f.detach())
        if v < self.best_f:  # False for nan
            self.best_f = v
        if self.solved_at is None and v <= self.target:
            self.solved_at = self.nfev
            self.nhvp_at_solve, self.nhev_at_solve = self.nhvp, self.nhev
        return f


@dataclass(frozen=True)
class Instance:
    """A problem from one start."""

    pb: ClassicFunction
    scale: float
    x0: Tensor
    f0: float
    g0_inf: float
    g0_2: float

    @property
    def key(self) -> str:
        return f"{self.pb.name}@{self.scale:g}"

    @property
    def target(self) -> float:
        """The Moré-Wild threshold; -inf (never met) where f(x0) is not finite: such a start
        is left out of the comparison."""
        if not math.isfinite(self.f0):
            return -math.inf
        return self.pb.f_star + MW_TAU * (self.f0 - self.pb.f_star)


def make_instance(pb: ClassicFunction, scale: float) -> Instance:
    x0 = pb.x0(scale=scale, dtype=torch.float64)
    x = x0.clone().requires_grad_()
    f = pb.fun(x)
    (g,) = torch.autograd.grad(f, x)
    return Instance(pb, scale, x0, float(f.detach()), float(g.abs().max()), float(g.norm()))


# -- the solvers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Solver:
    library: str  # "hesse", "scipy", "torchmin", "torch.optim"
    method: str

    @property
    def key(self) -> str:
        return f"{self.library}:{self.method}"


HESSE_METHODS = tuple(HESSE_METHOD_NAMES)
SCIPY_METHODS = ("BFGS", "L-BFGS-B", "Newton-CG", "trust-ncg", "trust-krylov", "trust-exact")
TORCHMIN_METHODS = ("bfgs", "l-bfgs", "newton-cg", "trust-ncg", "trust-exact")
SOLVERS = (
    [Solver("hesse", m) for m in HESSE_METHODS]
    + [Solver("scipy", m) for m in SCIPY_METHODS]
    + [Solver("torchmin", m) for m in TORCHMIN_METHODS]
    + [Solver("torch.optim", "LBFGS")]
)
#: hesse method -> its scipy counterpart.
PAIRS = (
    ("newton-cg", "Newton-CG"),
    ("trust-ncg", "trust-ncg"),
    ("trust-exact", "trust-exact"),
    ("bfgs", "BFGS"),
    ("l-bfgs", "L-BFGS-B"),
)


def run_hesse(method: str, inst: Instance, c: Counter) -> dict:
    r = hesse.minimize(
        c,
        inst.x0,
        method,
        max_iter=c.budget,
        options={"gtol": 0.0, "grad_rtol": GRAD_RTOL, "max_fev": c.budget, "history": True},
    )
    out = {
        "status": r.status,
        "message": r.message,
        "success": bool(r.success),
        "nit": r.nit,
        "nfev_reported": r.nfev,
        "nhvp": r.nhvp,
        "nhev": r.nhev,
        "f_reported": float(r.fun),
    }
    if c.solved_at is not None and r.history:  # the products when the test was first met
        at = next((h for h in r.history if h["nfev"] >= c.solved_at), r.history[-1])
        out["nhvp_at_solve"], out["nhev_at_solve"] = at["nhvp"], at["nhev"]
    return out


def reported(info: dict) -> dict:
    """The fields of a peer's result that the profile keeps."""
    return {
        "status": info["status"],
        "message": info["message"],
        "success": info["success"],
        "nit": info["nit"],
        "nfev_reported": info["nfev"],
    }


def run_scipy(method: str, inst: Instance, c: Counter) -> dict:
    def count_hvp() -> None:
        c.nhvp += 1

    def count_hess() -> None:
        c.nhev += 1

    keep = method in ("Newton-CG", "trust-ncg", "trust-krylov")
    obj = ScipyObjective(c, inst.pb.fun, keep, on_hvp=count_hvp, on_hess=count_hess)
    opts: dict[str, Any] = {"maxiter": c.budget}
    if method == "BFGS":
        opts["gtol"] = GRAD_RTOL * inst.g0_inf  # inf-norm is BFGS's default
    elif method == "L-BFGS-B":
        opts.update(maxfun=c.budget, gtol=GRAD_RTOL * inst.g0_inf, ftol=10 * EPS)
    elif method == "Newton-CG":
        opts["xtol"] = 1e-12
    elif method in ("trust-ncg", "trust-krylov", "trust-exact"):
        opts["gtol"] = GRAD_RTOL * inst.g0_2  # the trust regions test the 2-norm
    hessp = method in ("Newton-CG", "trust-ncg", "trust-krylov")
    _, info = scipy_minimize(obj, inst.x0, method, opts, hessp=hessp, hess=method == "trust-exact")
    return {
        **reported(info),
        "nhvp": c.nhvp,
        "nhev": c.nhev,
        "f_reported": info["fun"],
        "nhvp_at_solve": c.nhvp_at_solve,
        "nhev_at_solve": c.nhev_at_solve,
    }


def run_torchmin(method: str, inst: Instance, c: Counter) -> dict:
    opts: dict[str, Any] = {"max_iter": c.budget}
    if method in ("bfgs", "l-bfgs"):
        # xtol is an absolute test on both the step and the change of f, gtd_tol one on
        # the slope g.d (it stops at g.d > -1e-10): 0 leaves the gradient test (inf-norm),
        # a step of exactly zero and a direction that is not one of descent.
        opts.update(gtol=GRAD_RTOL * inst.g0_inf, xtol=0.0, gtd_tol=0.0)
        if method == "l-bfgs":
            opts["history_size"] = 10  # its default is 100; hesse, scipy and torch use 10
    elif method == "newton-cg":
        opts["xtol"] = 1e-12  # mean |step| per coordinate, as scipy's
    else:
        opts["gtol"] = GRAD_RTOL * inst.g0_2
    _, info = torchmin_minimize(c, inst.x0, method, opts)
    return {**reported(info), "nhvp": None, "nhev": None, "f_reported": info["fun"]}


def run_torch_lbfgs(inst: Instance, c: Counter) -> dict:
    x, info = torch_lbfgs(
        c, inst.x0, history_size=10, tolerance_grad=1e-10, max_iter=c.budget, max_eval=c.budget
    )
    return {
        "status": 0,
        "message": "one step() ended",
        "success": True,
        "nit": -1 if info["nit"] is None else int(info["nit"]),
        "nfev_reported": -1 if info["nfev"] is None else int(info["nfev"]),
        "nhvp": None,
        "nhev": None,
        "f_reported": float(inst.pb.fun(x)),
    }


def run_one(s: Solver, inst: Instance, limit: float, budget: int) -> dict:
    start = time.perf_counter()
    c = Counter(inst.pb.fun, inst.target, budget, start + limit)
    rec: dict[str, Any] = {"solver": s.key, "problem": inst.pb.name, "scale": inst.scale}
    try:
        with (
            time_limit(limit),
            warnings.catch_warnings(),
            np.errstate(all="ignore"),
        ):
            warnings.simplefilter("ignore")
            if s.library == "hesse":
                info = run_hesse(s.method, inst, c)
            elif s.library == "scipy":
                info = run_scipy(s.method, inst, c)
            elif s.library == "torchmin":
                info = run_torchmin(s.method, inst, c)
            else:
                info = run_torch_lbfgs(inst, c)
        rec["end"] = "solver"
        rec.update(info)
    except BudgetSpent:
        rec.update(end="budget", message=f"the counter stopped it after {budget} evaluations")
    except RunTimeout:
        rec.update(end="timeout", message=f"over the {limit:g} s limit")
    except Exception as e:  # a failed run is an unsolved one; say why
        rec.update(end="error", message=f"{type(e).__name__}: {e}"[:300])
    rec.update(
        seconds=time.perf_counter() - start,
        nfev=c.nfev,
        solved_at=c.solved_at,
        best_f=c.best_f if math.isfinite(c.best_f) else None,
    )
    if s.library == "scipy":  # products counted by the wrappers, also when cut short
        rec.update(
            nhvp=c.nhvp,
            nhev=c.nhev,
            nhvp_at_solve=c.nhvp_at_solve,
            nhev_at_solve=c.nhev_at_solve,
        )
    return rec


def profile_task(task: tuple) -> tuple[list[dict], float]:
    """Every solver on one problem from one start (in a worker process with ``--jobs``)."""
    name, scale, solver_keys, limit, budget = task
    torch.set_num_threads(1)
    inst = make_instance(FUNCTIONS[name], scale)
    t0 = time.perf_counter()
    recs = []
    for s in SOLVERS:
        if s.key in solver_keys:
            rec = run_one(s, inst, limit, budget)
            rec["f0"], rec["target"] = inst.f0, inst.target
            recs.append(rec)
    return recs, time.perf_counter() - t0
