"""``hesse compare``: several methods on one problem, on equal terms.

Two ways to compare, chosen from the problem and the methods:

* *minimise*: a convex problem or a classic function with :func:`hesse.minimize`'s
  methods (deterministic, full objective): iterations, function / gradient /
  Hessian-vector counts, time, final value; a data problem's objective is a
  :class:`hesse.FiniteSum`, so ``subsampled-newton`` minimises it too;
* *train*: any data problem with optimizers for models (:func:`hesse.optim.compare`):
  steps, time, training loss and test metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hesse
from hesse._minimize import FINITE_SUM_METHODS, METHODS
from hesse.cli._common import (
    Output,
    Timer,
    UserError,
    integer,
    parse_device,
    parse_dtype,
    positive,
)
from hesse.linalg import Status
from hesse.optim import LBFGS, AdaHessian, HessianFree, NewtonCG, Sophia, SubsampledNewton
from hesse.problems import FUNCTIONS, PROBLEMS, SCALABLE, Problem, classic_function, problem

#: Optimizers for models: name -> (factory(model, loss_fn, lr, seed), default lr, what it is).
TRAINERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], float, str]] = {
    "hessian-free": (
        lambda m, loss, lr, seed: HessianFree(
            m.parameters(), lr=lr, model=m, loss_fn=loss, seed=seed
        ),
        1.0,
        "hesse.optim.HessianFree (Gauss-Newton, CG, damping)",
    ),
    "subsampled-newton": (
        lambda m, loss, lr, seed: SubsampledNewton(
            m.parameters(), lr=lr, model=m, loss_fn=loss, seed=seed
        ),
        1.0,
        "hesse.optim.SubsampledNewton (Hessian on 10% of each batch)",
    ),
    "newton-cg": (
        lambda m, loss, lr, seed: NewtonCG(m.parameters(), lr=lr),
        1.0,
        "hesse.optim.NewtonCG (full-batch Hessian, CG)",
    ),
    "l-bfgs": (
        lambda m, loss, lr, seed: LBFGS(m.parameters(), lr=lr),
        1.0,
        "hesse.optim.LBFGS (strong Wolfe line search)",
    ),
    "adahessian": (
        lambda m, loss, lr, seed: AdaHessian(m.parameters(), lr=lr, seed=seed),
        0.1,
        "hesse.optim.AdaHessian (Hutchinson diagonal)",
    ),
    "sophia": (
        lambda m, loss, lr, seed: Sophia(m.parameters(), lr=lr, seed=seed),
        1e-2,
        "hesse.optim.Sophia (clipped diagonal Newton)",
    ),
    "adam": (
        lambda m, loss, lr, seed: torch.optim.Adam(m.parameters(), lr=lr),
        1e-2,
        "torch.optim.Adam",
    ),
    "sgd": (
        lambda m, loss, lr, seed: torch.optim.SGD(m.parameters(), lr=lr),
        0.1,
        "torch.optim.SGD",
    ),
    "nag": (
        lambda m, loss, lr, seed: torch.optim.SGD(
            m.parameters(), lr=lr, momentum=0.9, nesterov=True
        ),
        0.1,
        "torch.optim.SGD with Nesterov momentum 0.9",
    ),
    "adagrad": (
        lambda m, loss, lr, seed: torch.optim.Adagrad(m.parameters(), lr=lr),
        0.1,
        "torch.optim.Adagrad",
    ),
}
#: The names ``hesse compare`` knows, in both ways.
ALL_METHODS = tuple(dict.fromkeys((*METHODS, *TRAINERS)))
DEMO_MINIMIZE = ("newton", "newton-cg", "bfgs", "l-bfgs", "gd", "nag")
#: Seconds per method on the synthetic problems by default: the first-order methods need
#: thousands of iterations on logistic-correlated; the curves show how far they got.
TIME_LIMIT = 5.0
#: The default on the tall synthetic problems: every method of hesse.minimize.
ALL_MINIMIZE = (*METHODS, *FINITE_SUM_METHODS)
DEFAULT_TRAIN = ("hessian-free", "l-bfgs", "adam")


def add_compare(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compare",
        parents=[parent],
        help="compare optimisation methods on one problem",
        description="Run several methods on PROBLEM on equal terms. A convex problem or a "
        "classic function with hesse.minimize's methods is minimised deterministically "
        f"({', '.join(METHODS)}, and {', '.join(FINITE_SUM_METHODS)} on a data problem); "
        f"otherwise the model is trained with optimizers ({', '.join(TRAINERS)}) through "
        "hesse.optim.compare.",
    )
    p.add_argument(
        "problem",
        metavar="PROBLEM",
        help="a built-in problem or classic function (`hesse problems` lists them)",
    )
    p.add_argument(
        "--methods",
        metavar="LIST",
        help="comma-separated methods (default: "
        f"{','.join(DEMO_MINIMIZE)} to minimise, every method on {', '.join(SCALABLE)}; "
        f"{','.join(DEFAULT_TRAIN)} to train)",
    )
    sizes = ", ".join(f"{k} {v}" for k, v in SCALABLE.items())
    p.add_argument(
        "--samples",
        "--n",
        dest="samples",
        type=integer(),
        metavar="N",
        help=f"training samples of a synthetic problem (default: {sizes})",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="train with optimizers even where the problem could be minimised",
    )
    m = p.add_argument_group("minimising (hesse.minimize)")
    m.add_argument("--tol", type=positive, help="gradient tolerance (default 1e-8 in float64)")
    m.add_argument(
        "--max-iter", type=integer(), metavar="N", help="most iterations per method (default 2000)"
    )
    m.add_argument(
        "--time-limit",
        type=positive,
        metavar="SECONDS",
        help="seconds per method, after which its run stops (status time_limit; default: "
        f"none, {TIME_LIMIT:g} s on {', '.join(SCALABLE)})",
    )
    t = p.add_argument_group("training (hesse.optim.compare)")
    t.add_argument("--epochs", type=positive, metavar="N", help="passes over the data (default 30)")
    t.add_argument(
        "--time-budget", type=positive, metavar="SECONDS", help="seconds of training per method"
    )
    t.add_argument(
        "--batch-size",
        type=integer(),
        metavar="N",
        help="mini-batch size (default: the whole data)",
    )
    rates = ", ".join(f"{k} {v[1]:g}" for k, v in TRAINERS.items())
    t.add_argument(
        "--lr", type=positive, help=f"learning rate (step scale) of every method; default {rates}"
    )
    p.set_defaults(run=run_compare)


def parse_methods(text: str | None, default: tuple[str, ...]) -> list[str]:
    """``--methods`` as a list of known names."""
    if text is None:
        return list(default)
    names = [m.strip().lower().replace("_", "-") for m in text.split(",") if m.strip()]
    aliases = {"lbfgs": "l-bfgs", "newtoncg": "newton-cg", "hf": "hessian-free"}
    names = [aliases.get(n, n) for n in names]
    if not names:
        raise UserError("--methods is empty; give names separated by commas, e.g. newton-cg,adam")
    for n in names:
        if n not in ALL_METHODS:
            raise UserError(f"unknown method {n!r}; hesse compare knows: {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def run_compare(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse compare PROBLEM``."""
    timer = Timer()
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    name = args.problem
    samples = getattr(args, "samples", None)
    if samples is not None and name not in SCALABLE:
        raise UserError(
            f"--samples applies to the synthetic problems ({', '.join(SCALABLE)}); {name} has "
            "a fixed size"
        )
    if name in PROBLEMS:
        p = problem(name, dtype, device, samples=samples)
        fun_ok = p.convex
    elif name.replace("_", "-").lower() in FUNCTIONS:
        p, fun_ok = None, True
    else:
        raise UserError(f"unknown problem {name!r}; `hesse problems` lists the built-in ones")
    wanted = parse_methods(args.methods, ())
    # a data problem's objective is a FiniteSum: the subsampling methods minimise it too
    minimizers = (*METHODS, *FINITE_SUM_METHODS) if p is not None else METHODS
    minimise = fun_ok and not args.train and all(m in minimizers for m in (wanted or METHODS))
    if p is None and any(m in FINITE_SUM_METHODS for m in wanted):
        raise UserError(
            f"{', '.join(m for m in wanted if m in FINITE_SUM_METHODS)} subsamples data; "
            f"{name} is a function of one vector: choose from {', '.join(METHODS)}"
        )
    if args.train and p is None:
        raise UserError(f"--train needs a data problem; {name} is a function of one vector")
    if minimise:
        _refuse(args, ("epochs", "time_budget", "batch_size", "lr"), "training", name)
        limit = getattr(args, "time_limit", None)
        if limit is None and name in SCALABLE:
            limit = TIME_LIMIT
        methods = wanted or list(ALL_MINIMIZE if name in SCALABLE else DEMO_MINIMIZE)
        if p is not None:
            torch.manual_seed(args.seed)
            fun, x0 = p.objective(p.make_model())
            f_star = None
        else:
            f = classic_function(name)
            fun, x0, f_star = f.fun, f.x0(dtype=dtype or torch.float64, device=device), f.f_star
        convex = p is not None and p.convex
        runs = minimize_all(fun, x0, methods, args.tol, args.max_iter, ui, limit, convex)
        results = {"command": "compare", "mode": "minimize", "problem": name}
        results.update(minimize_summary(runs, f_star))
        print_minimize(results, ui, f"{name}: hesse.minimize from the same start")
        path = ui.path("convergence.png")
        if path is not None:
            from hesse.cli import _figures

            data = _figures.convergence(results, path, f"{name}: convergence of each method")
            ui.write_json("convergence.json", data)
    else:
        if p is None:
            raise UserError(
                f"{name} is a function of one vector: compare it with hesse.minimize's methods "
                f"({', '.join(METHODS)})"
            )
        not_here = [m for m in wanted if m not in TRAINERS]
        if not_here:
            raise UserError(
                f"{', '.join(not_here)} minimise a function of one vector and cannot train "
                f"{name}'s model; choose from {', '.join(TRAINERS)}"
            )
        _refuse(args, ("tol", "max_iter", "time_limit"), "minimizing", name)
        methods = wanted or list(DEFAULT_TRAIN)
        epochs = args.epochs if args.epochs is not None or args.time_budget else 30.0
        results = {"command": "compare", "mode": "train", "problem": name}
        results.update(
            train_all(p, methods, ui, epochs, args.time_budget, args.batch_size, args.lr, args.seed)
        )
        print_train(results, ui, p)
        path = ui.path("training.png")
        if path is not None:
            from hesse.cli import _figures

            data = _figures.training(results, path, f"{name}: training", p.metric_name)
            ui.write_json("training.json", data)
    results["time_s"] = timer.seconds
    ui.write_json("compare.json", results)
    return results


def _refuse(args: argparse.Namespace, options: tuple[str, ...], what: str, name: str) -> None:
    """A user error for options of the other kind of comparison."""
    given = [o for o in options if getattr(args, o) is not None]
    if not given:
        return
    flags = " and ".join("--" + o.replace("_", "-") for o in given)
    verb = "apply" if len(given) > 1 else "applies"
    if what == "training":
        raise UserError(
            f"{flags} {verb} to training, but {name} is minimised here with hesse.minimize: "
            f"drop {flags}, or add --train to train its model instead"
        )
    raise UserError(
        f"{flags} {verb} to minimising with hesse.minimize, but {name} is trained here: "
        f"drop {flags}"
    )


# --------------------------------------------------------------------------- minimise


def minimize_all(
    fun: Callable, x0: torch.Tensor, methods: list[str], tol: float | None, max_iter: int | None,
    ui: Output, time_limit: float | None = None, convex: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run :func:`hesse.minimize` with each method from ``x0``; ``{method: (result,
    seconds)}``. With ``time_limit``, a run still going after that many seconds stops
    (through the callback) with the status :attr:`hesse.linalg.Status.TIME_LIMIT`. A
    ``convex`` objective has no saddle points: no method checks for one (the check forms
    the dense Hessian, or runs Lanczos, over all the data at the end)."""
    if tol is None:
        tol = 1e-8 if x0.dtype == torch.float64 else None
    if tol is not None and not tol > 0:
        raise UserError(f"--tol must be positive, got {tol}")
    if max_iter is not None and max_iter < 1:
        raise UserError(f"--max-iter must be a positive integer, got {max_iter}")
    runs: dict[str, Any] = {}
    with ui.progress("minimising", total=len(methods)) as advance:
        for m in methods:
            # one iteration first, off the clock: the first call of a code path (autograd's
            # and torch.func's set-up) would otherwise be charged to whichever method is first
            hesse.minimize(fun, x0, m, tol=tol, max_iter=1)
            advance(0, f"hesse.minimize({m!r})")
            t0 = time.perf_counter()

            def over(_, t0=t0):
                return time_limit is not None and time.perf_counter() - t0 > time_limit

            options = {"history": True, **({"saddle_check": False} if convex else {})}
            r = hesse.minimize(fun, x0, m, tol=tol, max_iter=max_iter or 2000, callback=over,
                               options=options)  # fmt: skip
            if r.status is Status.CALLBACK:
                advice = Status.TIME_LIMIT.advice(time_limit="--time-limit")
                message = f"stopped after the time limit of {time_limit:g} s; {advice}"
                r = dataclasses.replace(r, status=Status.TIME_LIMIT, message=message)
            runs[m] = (r, time.perf_counter() - t0)
            advance(1)
    return runs


def minimize_summary(runs: dict[str, Any], f_star: float | None) -> dict[str, Any]:
    """The table and the curves of a minimisation comparison."""
    best = min(float(r.fun) for r, _ in runs.values() if math.isfinite(float(r.fun)))
    ref = best if f_star is None else f_star
    methods = {}
    for m, (r, seconds) in runs.items():
        methods[m] = {
            "nit": r.nit,
            "nfev": r.nfev,
            "njev": r.njev,
            "nhvp": r.nhvp,
            "nhev": r.nhev,
            "time_s": seconds,
            "fun": float(r.fun),
            "grad_norm": float(torch.linalg.vector_norm(r.jac)),
            "success": r.success,
            "status": r.status,
            "history": {
                key: [h[key] for h in r.history]
                for key in ("nit", "fun", "grad_norm", "time", "nfev", "njev", "nhvp")
            },
        }
    return {
        "f_star": ref,
        "f_star_source": "known" if f_star is not None else "best",
        "methods": methods,
    }


def print_minimize(results: dict[str, Any], ui: Output, title: str) -> None:
    rows = [
        [m, d["nit"], d["nfev"], d["njev"], d["nhvp"], d["nhev"], d["time_s"],
         d["fun"] - results["f_star"], d["status"]]
        for m, d in results["methods"].items()
    ]  # fmt: skip
    ui.table(
        title, ["method", "iter", "f", "∇f", "Hv", "∇²f", "time (s)", "f − f*", "status"], rows
    )
    ui.print(
        "f, ∇f, Hv, ∇²f: evaluations of the function and the gradient, Hessian-vector "
        "products, dense Hessians"
    )
    ui.print(
        f"f* = {results['f_star']:.12g} ("
        + ("the known minimum" if results["f_star_source"] == "known" else "the best value found")
        + ")"
    )


# ------------------------------------------------------------------------------ train


def train_all(
    p: Problem, methods: list[str], ui: Output, epochs: float | dict[str, float] | None,
    time_budget: float | None,
    batch_size: int | None, lr: float | None, seed: int,
    models: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``p``'s model with each method through :func:`hesse.optim.compare`.

    Args:
        epochs: Passes over the data, for all methods or per method.
        models: If given, receives each method's model (trained in place).
    """
    per_method = epochs if isinstance(epochs, dict) else dict.fromkeys(methods, epochs)
    for what, v in (*(("epochs", e) for e in per_method.values()), ("time-budget", time_budget),
                    ("lr", lr)):  # fmt: skip
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{what} must be a positive finite number, got {v}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    curves = {}
    with ui.progress("training", total=len(methods)) as advance:
        for m in methods:
            make, default_lr, _ = TRAINERS[m]
            rate = default_lr if lr is None else lr

            def factory(model, make=make, rate=rate, m=m):
                if models is not None:
                    models[m] = model
                return make(model, p.loss_fn, rate, seed)

            advance(0, f"training with {m}")
            curves[m] = hesse.optim.compare(
                p.make_model, p.loss_fn, p.train, {m: factory}, epochs=per_method[m],
                time_budget=time_budget, batch_size=batch_size,
                regularizer=p.regularizer if p.l2 else None, test_data=p.test,
                metric=p.metric, evals_per_epoch=1, seed=seed,
            )[m]  # fmt: skip
            advance(1)
    out = {}
    for m, c in curves.items():
        out[m] = {
            "optimizer": TRAINERS[m][2],
            "lr": TRAINERS[m][1] if lr is None else lr,
            "steps": c.steps[-1],
            "epochs": c.epoch[-1],
            "time_s": c.time[-1],
            "loss": c.loss[-1],
            "test_metric": c.test[-1] if c.test else None,
            "diverged": c.diverged,
            "curve": {"time": c.time, "epoch": c.epoch, "loss": c.loss, "test": c.test},
        }
    return {
        "metric": p.metric_name,
        "batch_size": batch_size,
        "epochs": epochs,
        "time_budget_s": time_budget,
        "loss_floor": p.loss_floor,
        "methods": out,
    }


def print_train(results: dict[str, Any], ui: Output, p: Problem) -> None:
    rows = [
        [m, d["steps"], d["epochs"], d["time_s"], d["loss"], d["test_metric"], d["diverged"]]
        for m, d in results["methods"].items()
    ]
    ui.table(
        f"{p.name}: training from the same initial weights",
        ["method", "steps", "epochs", "time (s)", "training loss", f"test {p.metric_name}",
         "diverged"],
        rows,
    )  # fmt: skip
