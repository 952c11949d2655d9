"""The solvers of ``logistic.py`` (which describes the method), each a function
``(problem, setting) -> (x, info)``, and the settings each is tried at.

Where the benchmark calls the objective (scipy, ``torch.optim``, ``SubsampledNewton``) a
:class:`_solvers.Watch` ends the run at the first evaluation whose gradient meets the
target; scikit-learn and ``hesse.minimize`` stop by their own tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import hesse
from _logistic import TARGET, Logistic
from _solvers import (
    Reached,
    ScipyObjective,
    Watch,
    hesse_minimize,
    scipy_minimize,
    sklearn_logistic,
    torch_lbfgs,
)

Fn = Callable[[Logistic, Any], tuple[Tensor, dict]]


def scipy_lbfgsb(lg: Logistic, setting: Any) -> tuple[Tensor, dict]:
    watch = Watch(lg.target)
    opts = {"maxcor": setting, "gtol": 0.0, "ftol": 0.0, "maxiter": 10**6, "maxfun": 10**6}
    x, info = scipy_minimize(ScipyObjective(lg.fun, watch=watch), lg.zeros(), "L-BFGS-B", opts)
    return x, {"nfev": watch.nfev, **({"status": info["message"]} if "message" in info else {})}


def sklearn_solver(solver: str) -> Fn:
    def fn(lg: Logistic, setting: Any) -> tuple[Tensor, dict]:
        return sklearn_logistic(lg.Xn, lg.yn, solver, 1.0, setting * lg.target, True, 10**6)

    return fn


def lbfgs(lg: Logistic, setting: Any) -> tuple[Tensor, dict]:
    watch = Watch(lg.target)
    return torch_lbfgs(lg.fun, lg.zeros(), setting, 0.0, 10**6, 10**7, watch=watch)


def hesse_min(method: str) -> Fn:
    return lambda lg, setting: hesse_minimize(lg.fun, lg.zeros(), method, TARGET)


def hesse_lbfgs(lg: Logistic, setting: int) -> tuple[Tensor, dict]:
    return hesse_minimize(lg.fun, lg.zeros(), "l-bfgs", TARGET, memory=setting)


def hesse_subsampled(lg: Logistic, setting: dict) -> tuple[Tensor, dict]:
    p = lg.problem
    model = p.make_model()
    X, y = p.train
    opt = hesse.optim.SubsampledNewton(
        model.parameters(),
        model=model,
        loss_fn=p.loss_fn,
        l2=p.l2,
        curvature="ggn",
        max_iter=10**4,
        **setting,
    )
    watch = Watch(lg.target)

    def flat() -> Tensor:
        return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def closure() -> Tensor:
        opt.zero_grad()
        loss = p.loss_fn(model(X), y) + p.regularizer(model)
        loss.backward()
        watch.check(flat(), torch.cat([model.weight.grad.reshape(-1), model.bias.grad]))
        return loss

    try:
        opt.step(closure, batch=(X, y))
        x = flat()
    except Reached:
        x = watch.x
    st = opt.global_state()
    return x, {
        "nfev": watch.nfev,
        "nit": st.get("step"),
        "final_subsample": st.get("subsample_size"),
    }


def hesse_finite_sum(lg: Logistic, setting: dict) -> tuple[Tensor, dict]:
    """``hesse.minimize(FiniteSum, method="subsampled-newton")``: the problem's own
    objective (:meth:`hesse.problems.Problem.objective`, closed-form subsampled Hessian),
    stopped by hesse's own test at the benchmark's absolute target ``||g||_2 <=
    lg.target`` (computed outside the time, as scikit-learn's ``tol`` and the ``Watch``
    of the others are: with a relative ``grad_rtol`` it would first evaluate the gradient
    at zero over all the data, which its phases on growing samples do not need), without
    the saddle check (the problem is convex; the check forms the exact Hessian over all
    the data, about 0.17 s at n = 200,000)."""
    p = lg.problem
    fs, w0 = p.objective(p.make_model())
    r = hesse.minimize(
        fs,
        torch.zeros_like(w0),
        "subsampled-newton",
        options={"gtol": lg.target, "norm": 2, "saddle_check": False, **setting},
    )
    return r.x, {"nit": r.nit, "nfev": r.nfev, "nhev": r.nhev, "status": r.status}


@dataclass(frozen=True)
class Solver:
    key: str
    library: str
    fn: Fn
    settings: tuple = (None,)
    setting_name: str = ""


SN_SETTINGS = (  # the subsample at the start, its growth with the gradient, its cap
    {"subsample": 0.01, "subsample_growth": 0.5, "subsample_max": 0.05},
    {"subsample": 0.01, "subsample_growth": 0.5, "subsample_max": 0.1},
    {"subsample": 0.02, "subsample_growth": 0.5, "subsample_max": 0.25},
)
FS_SETTINGS = tuple(  # the same, and the phases on growing samples or none
    {**s, "gradient_sample": g}
    for s in (*SN_SETTINGS[1:], {"subsample": 0.1, "subsample_growth": 0.0})
    for g in ("auto", None)
)
# the same with the whole method first on a float32 copy of the data, then float64
MIXED_SETTINGS = tuple({**s, "precision": "mixed"} for s in FS_SETTINGS if s["gradient_sample"])
SOLVERS = [
    Solver("scipy:L-BFGS-B", "scipy", scipy_lbfgsb, (10, 30), "maxcor"),
    Solver("sklearn:lbfgs", "sklearn", sklearn_solver("lbfgs"), (1.0, 1 / 3, 0.1), "tol/target"),
    Solver(
        "sklearn:newton-cg",
        "sklearn",
        sklearn_solver("newton-cg"),
        (1.0, 1 / 3, 0.1),
        "tol/target",
    ),
    Solver("torch.optim:LBFGS", "torch", lbfgs, (10, 100), "history_size"),
    Solver("hesse:l-bfgs", "hesse", hesse_lbfgs, (10, 30, 100), "memory"),
    Solver("hesse:newton-cg", "hesse", hesse_min("newton-cg")),
    Solver("hesse:trust-ncg", "hesse", hesse_min("trust-ncg")),
    Solver("hesse:subsampled-newton", "hesse", hesse_subsampled, SN_SETTINGS, "setting"),
    Solver("hesse:minimize-ssn", "hesse", hesse_finite_sum, FS_SETTINGS, "setting"),
    Solver("hesse:minimize-ssn-mixed", "hesse", hesse_finite_sum, MIXED_SETTINGS, "setting"),
]
SEQUENTIAL_LADDER = ("sklearn:lbfgs", "sklearn:newton-cg")  # loosest first: stop at success
