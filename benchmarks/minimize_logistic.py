"""How long does each solver take to fit a tall logistic regression to the same gradient
norm? ``hesse.minimize`` against scipy, pytorch-minimize, ``torch.optim.LBFGS`` and
scikit-learn (``minimize.py --part logistic`` runs the same).

``sklearn.datasets.make_classification(n_samples=200000, n_features=100,
random_state=0)`` in float64, ``f(w) = mean(softplus(x_i.w) - y_i x_i.w) + 0.5e-3 ||w||^2``
(no intercept), ``w0 = 0``, target ``||grad f(w)||_2 <= 1e-6 ||grad f(w0)||_2``. Solvers: hesse
newton-cg, trust-ncg, l-bfgs, newton and bfgs (``options={"gtol": 0, "grad_rtol": 1e-6,
"norm": 2}``: the target itself); scipy Newton-CG, trust-ncg (``gtol`` = the target) and
L-BFGS-B on torch derivatives; ``torch.optim.LBFGS`` (strong Wolfe, history 10);
pytorch-minimize newton-cg and l-bfgs; scikit-learn's ``LogisticRegression(fit_intercept=False,
C=1/(n 1e-3))`` with ``newton-cg`` and ``lbfgs`` (the same objective). The peers' stopping
tests measure other things (a step length, a gradient's inf-norm), so each peer's tolerance
is calibrated first, untimed: the loosest value of a ladder whose run reaches the target.
Every run (calibration and timed) is checked by the 2-norm of the gradient of OUR f at the
returned point; a solver that misses the target (or runs over 120 s) is reported as such,
not as a time.
Times are wall clock, end to end (the solver call and its conversions), the median of 3
interleaved rounds (every solver once per round, in a rotating order), with the ratio to the
fastest peer that reached the target. torch runs on its default number of threads here
(``torch.get_num_threads()`` at start-up: 2 on a 2-core machine), numpy's OpenBLAS on one.
Results to ``benchmarks/results/minimize_logistic.json``.

Run (from the repository root, after ``make bench-deps``)::

    .venv/bin/python benchmarks/minimize_logistic.py            # a few minutes
    .venv/bin/python benchmarks/minimize_logistic.py --quick    # 10,000 samples, one round

The peers' runners are in ``_solvers.py``, the problem and the checked runs in ``_logistic.py``
(both shared with ``logistic.py``).
"""

from __future__ import annotations

import os

# Before numpy/scipy load OpenBLAS: one BLAS thread for scipy (and sklearn's numpy).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from _harness import (
    RESULTS,
    finish,
    fmt,
    machine,
    median,
    print_header,
    print_table,
    rotations,
    write_json,
)
from _logistic import TARGET, Logistic, checked_run, rank_by_best_peer
from _solvers import (
    ScipyObjective,
    hesse_minimize,
    scipy_minimize,
    sklearn_logistic,
    torch_lbfgs,
    torchmin_minimize,
)

DEFAULT_THREADS = torch.get_num_threads()  # before the profile of minimize.py sets 1
PEER_DISTS = ("scipy", "pytorch-minimize", "scikit-learn")
LAM = 1e-3


def make_logistic(n_samples: int) -> Logistic:
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n_samples, n_features=100, random_state=0)
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = y.astype(np.float64)
    return Logistic("logistic", torch.from_numpy(X), torch.from_numpy(y), LAM, intercept=False)


# -- the solvers: (problem, setting) -> (w, info) --------------------------------------------

LogFn = Callable[[Logistic, Any], tuple[Tensor, dict]]


def lg_hesse(method: str) -> LogFn:
    return lambda p, setting: hesse_minimize(p.fun, p.zeros(), method, TARGET)


def lg_scipy(method: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        second = method in ("Newton-CG", "trust-ncg")
        obj = ScipyObjective(p.fun, p.fun, keep_graph=second)
        opts: dict[str, Any] = {"maxiter": 100000}
        if method == "Newton-CG":
            opts["xtol"] = setting
        elif method == "trust-ncg":
            opts["gtol"] = TARGET * p.g0  # the target itself (2-norm)
        else:  # L-BFGS-B: projected gradient's inf-norm; no test on f
            opts.update(gtol=setting * p.g0, ftol=0.0, maxfun=100000)
        w, info = scipy_minimize(obj, p.zeros(), method, opts, hessp=second)
        return w, {"nit": info["nit"], "nfev": info["nfev"], "status": info["message"]}

    return fn


def lg_torch_lbfgs(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
    # tolerance_grad: on the gradient's inf-norm
    return torch_lbfgs(p.fun, p.zeros(), 10, setting * p.g0, max_iter=20000, max_eval=25000)


def lg_torchmin(method: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        if method == "newton-cg":
            opts = {"xtol": setting}  # mean |step| per coordinate
        else:
            # no absolute tests on the step, f's change or the slope (see _minimize_runs)
            opts = {"gtol": setting * p.g0, "xtol": 0.0, "gtd_tol": 0.0, "history_size": 10}
        w, info = torchmin_minimize(p.fun, p.zeros(), method, opts)
        return w, {"nit": info["nit"], "nfev": info["nfev"]}

    return fn


def lg_sklearn(solver: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        # tol: on the gradient's inf-norm (of the same f)
        C = 1.0 / (p.X.shape[0] * LAM)
        tol = setting * p.g0
        return sklearn_logistic(p.Xn, p.yn, solver, C, tol, fit_intercept=False, max_iter=100000)

    return fn


@dataclass(frozen=True)
class LogSolver:
    key: str
    library: str
    fn: LogFn
    ladder: tuple = (None,)  # settings to calibrate over, loosest first
    setting_name: str = ""


RELATIVE_LADDER = (1e-6, 3e-7, 1e-7, 3e-8, 1e-8, 3e-9, 1e-9, 1e-10)
XTOL_LADDER = (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)
G0 = "/ ||g0||_2"
LOG_SOLVERS = [
    *(
        LogSolver(f"hesse:{m}", "hesse", lg_hesse(m))
        for m in ("newton-cg", "trust-ncg", "l-bfgs", "newton", "bfgs")
    ),
    LogSolver("scipy:Newton-CG", "scipy", lg_scipy("Newton-CG"), XTOL_LADDER, "xtol"),
    LogSolver("scipy:trust-ncg", "scipy", lg_scipy("trust-ncg")),
    LogSolver("scipy:L-BFGS-B", "scipy", lg_scipy("L-BFGS-B"), RELATIVE_LADDER, f"gtol {G0}"),
    LogSolver(
        "torch.optim:LBFGS", "torch.optim", lg_torch_lbfgs, RELATIVE_LADDER, f"tolerance_grad {G0}"
    ),
    LogSolver("torchmin:newton-cg", "torchmin", lg_torchmin("newton-cg"), XTOL_LADDER, "xtol"),
    LogSolver("torchmin:l-bfgs", "torchmin", lg_torchmin("l-bfgs"), RELATIVE_LADDER, f"gtol {G0}"),
    LogSolver(
        "sklearn:newton-cg", "sklearn", lg_sklearn("newton-cg"), RELATIVE_LADDER, f"tol {G0}"
    ),
    LogSolver("sklearn:lbfgs", "sklearn", lg_sklearn("lbfgs"), RELATIVE_LADDER, f"tol {G0}"),
]


def lg_run(s: LogSolver, p: Logistic, setting: Any, limit: float) -> dict:
    """One run, timed end to end, then checked (outside the time) on our f. A run over
    ``limit`` seconds is stopped and reported as such."""
    return checked_run(lambda: s.fn(p, setting), p, limit)


def run_logistic(args: argparse.Namespace) -> int:
    torch.set_num_threads(DEFAULT_THREADS)
    n_samples = 10000 if args.quick else 200000
    rounds = 1 if args.quick else args.rounds
    solvers = [s for s in LOG_SOLVERS if not args.solvers or s.key in args.solvers]
    meta = {
        **machine("cpu", PEER_DISTS),
        "part": "logistic",
        "torch_default_threads": DEFAULT_THREADS,
        "n_samples": n_samples,
        "n_features": 100,
        "lambda": LAM,
        "target_rel_grad_2norm": TARGET,
        "rounds": rounds,
        "time_limit_s": args.time_limit_logistic,
    }
    print_header(meta)
    start = time.perf_counter()
    p = make_logistic(n_samples)
    print(
        f"logistic regression: {n_samples} x 100, float64, lambda {LAM:g}; f(0) = {p.f0:.6f}, "
        f"||g(0)||_2 = {p.g0:.4e}; target ||g||_2 <= {TARGET:g} ||g(0)||_2"
    )

    # Calibration (also the warm-up): the loosest setting of each ladder that reaches it.
    chosen: dict[str, Any] = {}
    rows: dict[str, dict] = {}
    for s in solvers:
        tried = []
        for setting in s.ladder:
            r = lg_run(s, p, setting, args.time_limit_logistic)
            tried.append({"setting": setting, **r})
            if r["ok"]:
                break
        rows[s.key] = {
            "library": s.library,
            "setting_name": s.setting_name or None,
            "calibration": tried,
        }
        if tried[-1]["ok"]:
            chosen[s.key] = tried[-1]["setting"]
            what = f" ({s.setting_name} = {tried[-1]['setting']:g})" if s.setting_name else ""
            print(f"  calibrated {s.key}{what}: rel. grad {tried[-1]['rel_grad']:.2e}")
        else:
            last = tried[-1]
            why = last.get("error") or f"rel. grad {fmt(last.get('rel_grad'), '.2e')}"
            print(f"  {s.key}: no setting reached the target ({why})")
    timed = [s for s in solvers if s.key in chosen]
    times: dict[str, list[dict]] = {s.key: [] for s in timed}
    for _, order in rotations(timed, rounds):
        for s in order:
            times[s.key].append(lg_run(s, p, chosen[s.key], args.time_limit_logistic))

    for s in solvers:
        row = rows[s.key]
        if s.key not in chosen:
            last = row["calibration"][-1]
            status = f"failed: {last['error']}" if last.get("error") else "missed target"
            row.update(status=status, seconds=None)
            row.update(rel_grad=last.get("rel_grad"), f=last.get("f"))
            continue
        rs = times[s.key]
        ok = all(x["ok"] for x in rs)
        row.update(
            setting=chosen[s.key],
            status="reached target" if ok else "missed target in a timed round",
            seconds=median([x["seconds"] for x in rs]) if ok else None,
            times=[x["seconds"] for x in rs],
            rel_grad=max(x.get("rel_grad", math.inf) for x in rs),
            f=rs[-1].get("f"),
            nit=rs[-1].get("nit"),
            nfev=rs[-1].get("nfev"),
            nhvp=rs[-1].get("nhvp"),
        )
    best_peer = rank_by_best_peer(rows)
    columns = [("solver", "<20"), ("seconds", "8.3f"), ("x best peer", "11.2f")]
    columns += [("rel grad", "9.1e"), ("f", "18.12f"), ("nit", "5"), ("nfev", "5")]
    columns += [("setting", "9.0e"), ("status", "<")]
    shown = ("seconds", "ratio_to_best_peer", "rel_grad", "f", "nit", "nfev", "setting", "status")
    print_table(
        f"Logistic regression, median of {rounds} interleaved rounds, torch threads "
        f"{DEFAULT_THREADS}",
        columns,
        [[k, *(r.get(c) for c in shown)] for k, r in rows.items()],
    )
    print(f"  best peer: {best_peer}")
    finish(meta, start)
    out = {
        "meta": meta,
        "problem": {"f0": p.f0, "g0_norm_2": p.g0},
        "best_peer": best_peer,
        "solvers": rows,
        "notes": [
            "f(w) = mean BCE-with-logits(Xw, y) + 0.5e-3 ||w||^2, y in {0,1}, no intercept",
            "rel_grad: ||grad f(w)||_2 / ||grad f(0)||_2 of OUR f at the returned w (worst round)",
            "peers' tolerances calibrated untimed: the loosest rung of the ladder reaching 1e-6",
            "seconds: median over rounds, end to end; null where the target was missed",
            "L-BFGS methods use 10 pairs (torchmin's default is 100; set to 10)",
        ],
    }
    path = getattr(args, "out", None)
    path = path or RESULTS / f"minimize_logistic{'_quick' if args.quick else ''}.json"
    write_json(path, out, compact=True)
    print(f"({meta['total_seconds']:.0f} s)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the logistic part (``minimize.py`` takes them too)."""
    p.add_argument("--rounds", type=int, default=3, help="logistic timing rounds (default 3)")
    p.add_argument(
        "--time-limit-logistic",
        type=float,
        default=120.0,
        help="seconds per logistic run (default 120)",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10,000 samples, one round")
    p.add_argument("--solvers", nargs="+", help="subset of solver keys, e.g. hesse:bfgs")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    add_arguments(p)
    return run_logistic(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
