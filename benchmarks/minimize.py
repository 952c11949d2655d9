"""``hesse.minimize`` against scipy, pytorch-minimize and ``torch.optim.LBFGS``.

Two parts (``--part profile|logistic|all``).

**profile**: every problem of :data:`hesse.problems.FUNCTIONS` (the Moré-Garbow-Hillstrom
functions and a few more), from the standard start scaled by 1, 10 and 100 (a start of all
zeros does not change: watson's three starts are the same), in float64, solved by

* the 10 methods of ``hesse.minimize``;
* ``scipy.optimize.minimize`` with BFGS, L-BFGS-B, Newton-CG, trust-ncg, trust-krylov and
  trust-exact, derivatives from torch autograd (``jac=True`` returning ``(f, g)``; ``hessp``
  by double backward; ``hess`` by ``torch.func.hessian``);
* ``torchmin.minimize`` (pytorch-minimize) with bfgs, l-bfgs, newton-cg, trust-ncg and
  trust-exact;
* ``torch.optim.LBFGS(lr=1, history_size=10, line_search_fn="strong_wolfe",
  tolerance_grad=1e-10, tolerance_change=0, max_iter=max_eval=budget)``, one ``step``.

Equal terms. Every solver gets the same objective wrapped in a counter: one call of the
objective is one evaluation, whether the solver asks for ``f`` or for ``(f, g)``
(``hesse.minimize`` and pytorch-minimize call it once per point and take the gradient, and
for the second-order methods the Hessian-vector products, from its graph; scipy's products
reuse the gradient's graph when they are asked at the point evaluated last, and otherwise,
like its dense Hessians, run the function again outside the counter). Hessian-vector products
and dense Hessians are counted apart (for hesse from its result and history, for scipy in
the ``hessp``/``hess`` wrappers; pytorch-minimize's are not counted). The budget is 5000
evaluations: it is passed to every solver (``max_fev``/``max_iter``, ``maxiter``/``maxfun``,
``max_iter``/``max_eval``) and the counter ends the run at the 5001st call, so no solver
spends more. Stopping tolerances are set so that no solver stops before the test below can
be met: a gradient tolerance of 1e-12 times the start's gradient in each solver's own norm
(inf-norm: hesse, scipy BFGS and L-BFGS-B, pytorch-minimize's quasi-Newton; 2-norm: the trust
regions), ``ftol`` 10 eps for L-BFGS-B (hesse's ``ftol``), ``xtol`` 1e-12 for the Newton-CG
methods, ``xtol`` and ``gtd_tol`` 0 for pytorch-minimize's quasi-Newton (absolute tests on
the step, the change of ``f`` and the slope), whose l-bfgs keeps 10 pairs as the others do.

A problem is solved when the convergence test of Moré & Wild (2009) holds,
``f(x) <= f_star + 1e-7 (f(x0) - f_star)`` (``f_star`` the documented minimum), and a solver's
count is the number of evaluations at which the counter FIRST saw such a value (not the
solver's own final report), or infinity. A start where ``f`` is not finite has no such test
and is left out (jennrich-sampson from x100). Each run is guarded by a wall-clock limit (60 s) and
``try``/``except``: a run that fails or hangs is unsolved, and the reason is printed. Runs
use one thread each: ``OPENBLAS_NUM_THREADS=1`` (set here before numpy is imported) and
``torch.set_num_threads(1)``; problems are shared among ``--jobs`` processes (default 2).

The tables give, per start scale, the problems each solver solved and the median number of
evaluations over the problems it solved; then each hesse method against its scipy
counterpart over the problems both solved, the best method of each library (by problems
solved), Rosenbrock-100 from the standard start in detail (Hessian-vector products of the
Newton-CG and trust-region methods, evaluations of the L-BFGS methods), and every case
where a hesse method failed a problem that its scipy counterpart solved. Dolan-Moré
performance profiles (the share of problems a solver solves within a factor tau of the best
solver's evaluations) go to ``benchmarks/results/minimize_profile.png`` (hesse's and scipy's
methods) and ``minimize_profile_best.png`` (the best method of each library); every run's
numbers to ``minimize_profile.json``.

**logistic**: ``sklearn.datasets.make_classification(n_samples=200000, n_features=100,
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

    .venv/bin/python benchmarks/minimize.py --part profile    # 12 min on 2 cores (--jobs 2)
    .venv/bin/python benchmarks/minimize.py --part logistic   # a few minutes
    .venv/bin/python benchmarks/minimize.py --quick           # both parts, small, < 1 min

The profile runs its problems in ``--jobs`` processes (default 2, one torch thread each):
the counts do not depend on it, the run times do. ``--replot JSON`` redoes the tables,
figures and summaries from the runs stored in a profile JSON without running anything.
``--quick`` runs 3 problems from 2 start scales with a budget of 1000 evaluations and 5 s
per run, and a logistic problem of 10,000 samples in one round; its files get ``_quick`` in
their names. ``--help`` lists the options.
"""

from __future__ import annotations

import os

# Before numpy/scipy load OpenBLAS: one BLAS thread for scipy (and sklearn's numpy).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import contextlib
import datetime
import json
import math
import platform
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

import hesse
from hesse._minimize import METHODS as HESSE_METHOD_NAMES
from hesse.problems import FUNCTIONS, ClassicFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hvp_cost import cpu_model, version

DEFAULT_THREADS = torch.get_num_threads()  # before the profile part sets 1
RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = 5000  # evaluations per run
QUICK_BUDGET = 1000
MW_TAU = 1e-7  # the Moré-Wild test's tolerance
GRAD_RTOL = 1e-12  # stopping tolerance on the gradient, relative to the start's
SCALES = (1.0, 10.0, 100.0)
QUICK_PROBLEMS = ("rosenbrock", "beale", "rosenbrock-100")
EPS = float(np.finfo(float).eps)
PEER_DISTS = ("scipy", "pytorch-minimize", "scikit-learn", "matplotlib")


def git_state() -> dict:
    """The commit of the working tree, and whether src/ differs from it (hesse is imported
    from the working tree)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {
        "commit": git("rev-parse", "HEAD"),
        "src_modified": bool(status) if status is not None else None,
    }


def metadata(threads: int, extra: dict) -> dict:
    return {
        "git": git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hesse": hesse.__version__,
        "numpy": np.__version__,
        "peers": {dist: version(dist) for dist in PEER_DISTS},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch_default_threads": DEFAULT_THREADS,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "device": "cpu",
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **extra,
    }


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a dash as wide as the spec asks where there is no number."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(x, spec)


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float as a string ("inf", "nan"), so that the JSON file
    is standard JSON (``float()`` reads the strings back)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# == part (a): the performance profile ===================================================


class BudgetSpent(BaseException):
    """The counter refuses the evaluation after the budget. A BaseException, so that no
    solver's ``except Exception`` (or ``except RuntimeError``) swallows it."""


class RunTimeout(BaseException):
    """The run's wall-clock limit passed."""


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


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RunTimeout in the main thread after ``seconds`` (between bytecodes: a long C
    call finishes first; the counter checks the deadline too)."""

    def handler(signum: int, frame: Any) -> None:
        raise RunTimeout

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


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
    return Instance(
        pb,
        scale,
        x0,
        float(f.detach()),
        float(g.abs().max()),
        float(g.norm()),
    )


# -- derivatives for scipy ------------------------------------------------------------------


class ScipyObjective:
    """scipy's view of a torch function of a flat float64 vector: ``fg(x) -> (f, g)``
    through ``fun`` (the counter in the profile), ``hessp`` and ``hess`` by autograd.

    With ``keep_graph`` the gradient's graph of the last ``fg`` call is kept, and a product
    at that same point reuses it (as hesse does); otherwise, and at another point, a product
    runs ``raw`` again (outside the counter). ``on_hvp``/``on_hess`` count products."""

    def __init__(
        self,
        fun: Callable[[Tensor], Tensor],
        raw: Callable[[Tensor], Tensor],
        keep_graph: bool = False,
        on_hvp: Callable[[], None] | None = None,
        on_hess: Callable[[], None] | None = None,
    ):
        self.fun, self.raw, self.keep_graph = fun, raw, keep_graph
        self.on_hvp, self.on_hess = on_hvp, on_hess
        self._x: np.ndarray | None = None
        self._xl: Tensor | None = None
        self._g: Tensor | None = None

    def fg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        xl = torch.tensor(x, dtype=torch.float64).requires_grad_()
        f = self.fun(xl)
        (g,) = torch.autograd.grad(f, xl, create_graph=self.keep_graph)
        if self.keep_graph:
            self._x, self._xl, self._g = np.array(x, copy=True), xl, g
        return float(f), g.detach().numpy().copy()

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        if self.on_hvp is not None:
            self.on_hvp()
        v = torch.from_numpy(np.asarray(p, dtype=np.float64))
        if self._x is not None and np.array_equal(x, self._x):
            (hv,) = torch.autograd.grad(self._g, self._xl, v, retain_graph=True)
            return hv.numpy().copy()
        xl = torch.tensor(x, dtype=torch.float64).requires_grad_()
        (g,) = torch.autograd.grad(self.raw(xl), xl, create_graph=True)
        (hv,) = torch.autograd.grad(g, xl, v)
        return hv.numpy().copy()

    def hess(self, x: np.ndarray) -> np.ndarray:
        if self.on_hess is not None:
            self.on_hess()
        H = torch.func.hessian(self.raw)(torch.tensor(x, dtype=torch.float64))
        return H.detach().numpy().copy()


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


def run_scipy(method: str, inst: Instance, c: Counter) -> dict:
    def count_hvp() -> None:
        c.nhvp += 1

    def count_hess() -> None:
        c.nhev += 1

    keep = method in ("Newton-CG", "trust-ncg", "trust-krylov")
    obj = ScipyObjective(c, inst.pb.fun, keep, on_hvp=count_hvp, on_hess=count_hess)
    kw: dict[str, Any] = {}
    opts: dict[str, Any] = {"maxiter": c.budget}
    if method == "BFGS":
        opts["gtol"] = GRAD_RTOL * inst.g0_inf  # inf-norm is BFGS's default
    elif method == "L-BFGS-B":
        opts.update(maxfun=c.budget, gtol=GRAD_RTOL * inst.g0_inf, ftol=10 * EPS)
    elif method == "Newton-CG":
        kw["hessp"] = obj.hessp
        opts["xtol"] = 1e-12
    elif method in ("trust-ncg", "trust-krylov"):
        kw["hessp"] = obj.hessp
        opts["gtol"] = GRAD_RTOL * inst.g0_2  # the trust regions test the 2-norm
    elif method == "trust-exact":
        kw["hess"] = obj.hess
        opts["gtol"] = GRAD_RTOL * inst.g0_2
    r = scipy.optimize.minimize(
        obj.fg, inst.x0.numpy().copy(), method=method, jac=True, options=opts, **kw
    )
    return {
        "status": int(r.status),
        "message": str(r.message),
        "success": bool(r.success),
        "nit": int(getattr(r, "nit", -1)),
        "nfev_reported": int(r.nfev),
        "nhvp": c.nhvp,
        "nhev": c.nhev,
        "f_reported": float(r.fun),
        "nhvp_at_solve": c.nhvp_at_solve,
        "nhev_at_solve": c.nhev_at_solve,
    }


def run_torchmin(method: str, inst: Instance, c: Counter) -> dict:
    import torchmin

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
    r = torchmin.minimize(c, inst.x0.clone(), method=method, options=opts)
    return {
        "status": int(getattr(r, "status", -1)),
        "message": str(getattr(r, "message", "")),
        "success": bool(getattr(r, "success", False)),
        "nit": int(getattr(r, "nit", -1)),
        "nfev_reported": int(getattr(r, "nfev", -1)),
        "nhvp": None,
        "nhev": None,
        "f_reported": float(r.fun),
    }


def run_torch_lbfgs(inst: Instance, c: Counter) -> dict:
    x = inst.x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=c.budget,
        max_eval=c.budget,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        f = c(x)
        f.backward()
        return f

    opt.step(closure)
    state = opt.state[x]
    return {
        "status": 0,
        "message": "one step() ended",
        "success": True,
        "nit": int(state.get("n_iter", -1)),
        "nfev_reported": int(state.get("func_evals", -1)),
        "nhvp": None,
        "nhev": None,
        "f_reported": float(inst.pb.fun(x.detach())),
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


# -- summaries --------------------------------------------------------------------------


def evals(rec: dict) -> float:
    return math.inf if rec["solved_at"] is None else float(rec["solved_at"])


def solved_table(runs: dict[tuple[str, str], dict], keys: list[str], solvers: list[str]) -> dict:
    """Per solver: problems solved (of ``keys``), median evaluations over them, runs that
    ended in an error or a timeout."""
    out = {}
    for s in solvers:
        recs = [runs[(s, k)] for k in keys]
        solved = [evals(r) for r in recs if r["solved_at"] is not None]
        out[s] = {
            "solved": len(solved),
            "problems": len(keys),
            "median_evals": median(solved),
            "errors": sum(r["end"] == "error" for r in recs),
            "timeouts": sum(r["end"] == "timeout" for r in recs),
        }
    return out


def print_solved(title: str, table: dict) -> None:
    head = f"{'solver':<24} {'solved':>9} {'median evals':>13} {'errors':>7} {'timeouts':>9}"
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for s, row in table.items():
        print(
            f"{s:<24} {row['solved']:>4} / {row['problems']:<3} "
            f"{fmt(row['median_evals'], '13.0f')} {row['errors']:>7} {row['timeouts']:>9}"
        )


def pair_stats(runs: dict, keys: list[str], a: str, b: str) -> dict:
    both = [k for k in keys if runs[(a, k)]["solved_at"] and runs[(b, k)]["solved_at"]]
    ea = [evals(runs[(a, k)]) for k in both]
    eb = [evals(runs[(b, k)]) for k in both]
    return {
        "a": a,
        "b": b,
        "solved_a": sum(runs[(a, k)]["solved_at"] is not None for k in keys),
        "solved_b": sum(runs[(b, k)]["solved_at"] is not None for k in keys),
        "both": len(both),
        "median_a": median(ea),
        "median_b": median(eb),
        "median_ratio": median([x / y for x, y in zip(ea, eb)]),
        "fewer_a": sum(x < y for x, y in zip(ea, eb)),
        "fewer_b": sum(x > y for x, y in zip(ea, eb)),
        "only_a": [k for k in keys if runs[(a, k)]["solved_at"] and not runs[(b, k)]["solved_at"]],
        "only_b": [k for k in keys if runs[(b, k)]["solved_at"] and not runs[(a, k)]["solved_at"]],
    }


def print_pairs(pairs: list[dict], title: str) -> None:
    head = (
        f"{'A':<18} {'B':<18} {'solved A':>8} {'solved B':>8} {'both':>5} {'med A':>7} "
        f"{'med B':>7} {'med A/B':>8} {'A fewer':>8} {'B fewer':>8}"
    )
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for p in pairs:
        print(
            f"{p['a']:<18} {p['b']:<18} {p['solved_a']:>8} {p['solved_b']:>8} {p['both']:>5} "
            f"{fmt(p['median_a'], '7.0f')} {fmt(p['median_b'], '7.0f')} "
            f"{fmt(p['median_ratio'], '8.2f')} {p['fewer_a']:>8} {p['fewer_b']:>8}"
        )


def best_of(table: dict, library: str) -> str:
    """The solver of a library that solved most problems (ties: fewer median evaluations)."""
    rows = [(s, r) for s, r in table.items() if s.startswith(library + ":")]
    return min(rows, key=lambda sr: (-sr[1]["solved"], sr[1]["median_evals"] or math.inf))[0]


def profile_curves(runs: dict, keys: list[str], solvers: list[str]) -> dict[str, list[float]]:
    """Dolan-Moré ratios: per solver and problem, evaluations / the fewest of any solver in
    ``solvers`` (inf where unsolved, or unsolved by all)."""
    out: dict[str, list[float]] = {s: [] for s in solvers}
    for k in keys:
        t = {s: evals(runs[(s, k)]) for s in solvers}
        best = min(t.values())
        for s in solvers:
            out[s].append(t[s] / best if math.isfinite(best) and math.isfinite(t[s]) else math.inf)
    return out


def plot_profile(ax: Any, ratios: dict[str, list[float]], styles: dict, tau_max: float) -> None:
    for s, rs in ratios.items():
        n = len(rs)
        finite = sorted(r for r in rs if math.isfinite(r))
        xs = [1.0, *finite, tau_max]
        ys = [sum(r <= x for r in finite) / n for x in xs]  # share solved within x
        label = f"{s} ({len(finite)}/{n})"
        ax.step(xs, ys, where="post", label=label, **styles.get(s, {}))
    ax.set_xscale("log", base=2)
    ax.set_xlim(1, tau_max)
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("τ: within a factor τ of the best solver's evaluations (log2)")
    ax.set_ylabel("share of problems solved")


def draw_profiles(runs: dict, keys: list[str], best: dict, stem: Path, budget: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    hs = [s.key for s in SOLVERS if s.library == "hesse"]
    ss = [s.key for s in SOLVERS if s.library == "scipy"]
    ratios = profile_curves(runs, keys, hs + ss)
    finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
    tau_max = max(2.0, 2 ** math.ceil(math.log2(max(finite, default=2.0)) + 0.5))
    cmap = plt.get_cmap("tab10")
    starts = ", ".join(sorted({f"x{k.split('@')[1]}" for k in keys}, key=lambda t: float(t[1:])))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, group, other, name in (
        (axes[0], hs, best["scipy"], "hesse.minimize"),
        (axes[1], ss, best["hesse"], "scipy.optimize.minimize"),
    ):
        styles = {s: {"color": cmap(i % 10), "lw": 1.6} for i, s in enumerate(group)}
        styles[other] = {"color": "0.5", "ls": ":", "lw": 2.0}
        plot_profile(ax, {s: ratios[s] for s in [*group, other]}, styles, tau_max)
        ax.set_title(f"{name} methods (dotted: best of the other library)")
        ax.legend(fontsize=8, loc="lower right")
    axes[1].set_ylabel("")
    fig.suptitle(
        f"Performance profile on {len(keys)} problems (test functions from starts {starts}; "
        f"budget {budget} evaluations; solved: Moré-Wild test with {MW_TAU:g})\n"
        "ratios to the best of hesse and scipy; legend: (problems solved / problems)",
        fontsize=10,
    )
    fig.tight_layout()
    path = stem.with_name(stem.name + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    tops = list(best.values())
    ratios = profile_curves(runs, keys, tops)
    finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
    tau_max = max(2.0, 2 ** math.ceil(math.log2(max(finite, default=2.0)) + 0.5))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {s: {"color": cmap(i), "lw": 2.0} for i, s in enumerate(tops)}
    plot_profile(ax, ratios, styles, tau_max)
    ax.legend(loc="lower right")
    ax.set_title(
        f"Best method of each library (most problems solved)\n{len(keys)} problems from starts "
        f"{starts}, budget {budget} evaluations; legend: (problems solved / problems)",
        fontsize=10,
    )
    fig.tight_layout()
    path = stem.with_name(stem.name + "_best.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written


def rosenbrock100(runs: dict) -> dict | None:
    key = "rosenbrock-100@1"
    if ("hesse:trust-ncg", key) not in runs:
        return None
    pick = [
        "hesse:trust-ncg",
        "scipy:trust-ncg",
        "scipy:trust-krylov",
        "torchmin:trust-ncg",
        "hesse:newton-cg",
        "scipy:Newton-CG",
        "torchmin:newton-cg",
        "hesse:l-bfgs",
        "scipy:L-BFGS-B",
        "torch.optim:LBFGS",
        "torchmin:l-bfgs",
    ]
    rows = {}
    for s in pick:
        r = runs[(s, key)]
        rows[s] = {
            f: r.get(f)
            for f in (
                "solved_at",
                "nhvp_at_solve",
                "nfev",
                "nhvp",
                "end",
                "status",
                "message",
                "seconds",
            )
        }
    return rows


def print_rosenbrock100(rows: dict) -> None:
    head = (
        f"{'solver':<22} {'evals@solve':>11} {'HVPs@solve':>10} {'evals':>6} {'HVPs':>6} "
        f"{'s':>6}  end"
    )
    print(f"\nRosenbrock-100 from the standard start (x1)\n{head}\n{'-' * len(head)}")
    for s, r in rows.items():
        end = r["end"] if r["end"] != "solver" else f"{r['status']}"
        print(
            f"{s:<22} {fmt(r['solved_at'], '11d')} {fmt(r['nhvp_at_solve'], '10d')} "
            f"{r['nfev']:>6} {fmt(r['nhvp'], '6d')} {r['seconds']:6.2f}  {end}"
        )
    print(
        "  evals@solve: evaluations when the Moré-Wild test was first met; HVPs: Hessian-vector "
        "products (hesse: at the end of that iteration; pytorch-minimize: not counted)"
    )


def surprises(runs: dict, keys: list[str]) -> list[dict]:
    """Cases where a hesse method failed a problem that its scipy counterpart solved."""
    out = []
    for hm, sm in PAIRS:
        for k in keys:
            h, s = runs[(f"hesse:{hm}", k)], runs[(f"scipy:{sm}", k)]
            if s["solved_at"] is not None and h["solved_at"] is None:
                out.append(
                    {
                        "hesse": hm,
                        "scipy": sm,
                        "problem": k,
                        "scipy_evals": s["solved_at"],
                        "end": h["end"],
                        "status": h.get("status"),
                        "message": h.get("message"),
                        "hesse_best_f": h["best_f"],
                        "nfev": h["nfev"],
                    }
                )
    return out


def unsolvable(runs: dict, skeys: list[str], k: str) -> dict:
    """What is known of a problem no solver solved: its target, the lowest f any solver saw,
    and whether the test could be met at all (a start at the minimiser; an ``f_star``
    printed to 6 significant digits, rounded or cut, below the minimum found by more than
    the test allows)."""
    any_run = runs[(skeys[0], k)]
    f_star = FUNCTIONS[k.split("@")[0]].f_star
    f0, target = float(any_run["f0"]), float(any_run["target"])
    bests = [runs[(s, k)]["best_f"] for s in skeys if runs[(s, k)]["best_f"] is not None]
    best = min(bests, default=None)
    why = ""
    if f0 - f_star <= 1e-20 * max(1.0, abs(f_star)):
        why = "the start is a minimiser (f(x0) - f_star is rounding), the test is unattainable"
    elif best is not None and f_star != 0:
        unit = 10 ** (math.floor(math.log10(abs(f_star))) - 5)  # of the 6th digit
        if 0 < best - f_star <= unit and best > target:
            why = (
                f"f_star = {f_star:g} (6 digits) is {best - f_star:.2e} below the best f found, "
                f"more than the test's {target - f_star:.2e}: unattainable by rounding of f_star"
            )
    return {"f_star": f_star, "f0": f0, "target": target, "best_f_any": best, "why": why}


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


def run_profile(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    budget = args.budget
    names = list(QUICK_PROBLEMS) if args.quick else list(FUNCTIONS)
    if args.problems:
        names = args.problems
    scales = (1.0, 10.0) if args.quick else SCALES
    limit = args.time_limit
    solvers = [s for s in SOLVERS if not args.solvers or s.key in args.solvers]
    meta = metadata(
        1,
        {
            "part": "profile",
            "dtype": "float64",
            "budget": budget,
            "jobs": args.jobs,
            "more_wild_tau": MW_TAU,
            "grad_rtol": GRAD_RTOL,
            "time_limit_s": limit,
            "scales": scales,
        },
    )
    print(
        f"torch {meta['torch']}, {meta['cpu']}, torch.set_num_threads(1), "
        f"OPENBLAS_NUM_THREADS={meta['OPENBLAS_NUM_THREADS']}; peers: {meta['peers']}"
    )
    print(
        f"{len(names)} problems x {len(scales)} starts x {len(solvers)} solvers, budget "
        f"{budget} evaluations, {limit:g} s per run, {args.jobs} process(es)"
    )
    start = time.perf_counter()
    insts = [make_instance(FUNCTIONS[n], sc) for sc in scales for n in names]
    tasks = [(n, sc, [s.key for s in solvers], limit, budget) for sc in scales for n in names]
    print(f"per start, one mark per solver ({' '.join(s.key for s in solvers)}): + solved")
    runs: dict[tuple[str, str], dict] = {}
    if args.jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        results = pool.imap(profile_task, tasks)
    else:
        pool, results = None, map(profile_task, tasks)
    try:
        for inst, (recs, secs) in zip(insts, results):
            for rec in recs:
                runs[(rec["solver"], inst.key)] = rec
                if rec["end"] in ("error", "timeout"):
                    print(f"  {inst.key:<28} {rec['solver']:<20} {rec['end']}: {rec['message']}")
            line = "".join("+" if r["solved_at"] else "." for r in recs)
            print(f"{inst.key:<28} {line}  {secs:6.1f} s", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta["total_seconds"] = time.perf_counter() - start
    meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    stem = RESULTS / f"minimize_profile{'_quick' if args.quick else ''}"
    return report_profile(runs, names, [s.key for s in solvers], meta, stem)


def replot(path: Path) -> int:
    """Tables, figures and summaries again from the runs stored in a JSON file."""
    data = json.loads(path.read_text())
    runs = {(r["solver"], f"{r['problem']}@{r['scale']:g}"): r for r in data["runs"]}
    skeys = list(dict.fromkeys(r["solver"] for r in data["runs"]))
    meta = data["meta"]
    meta["reanalysed"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"re-analysing the {len(runs)} runs of {path} ({meta['date']})")
    return report_profile(runs, data["problems"], skeys, meta, path.with_suffix(""))


def report_profile(
    runs: dict[tuple[str, str], dict], names: list[str], skeys: list[str], meta: dict, stem: Path
) -> int:
    """Print the tables, draw the profiles and write the JSON (``stem`` + .json/.png)."""
    scales = [float(x) for x in meta["scales"]]
    budget = meta["budget"]
    # A start where f is not finite has no Moré-Wild threshold: left out.
    f0 = {k: float(r["f0"]) for (_, k), r in runs.items()}
    left_out = [
        f"{n}@{sc:g}" for sc in scales for n in names if not math.isfinite(f0[f"{n}@{sc:g}"])
    ]
    for k in left_out:
        print(f"left out {k}: f(x0) = {f0[k]} is not finite")
    keys = [f"{n}@{sc:g}" for sc in scales for n in names if f"{n}@{sc:g}" not in left_out]
    tables = {}
    for sc in scales:
        ks = [k for k in keys if k.endswith(f"@{sc:g}")]
        tables[f"{sc:g}"] = solved_table(runs, ks, skeys)
        print_solved(f"Start x{sc:g}: problems solved (of {len(ks)})", tables[f"{sc:g}"])
    tables["all"] = solved_table(runs, keys, skeys)
    print_solved(f"All starts: problems solved (of {len(keys)})", tables["all"])

    out: dict[str, Any] = {
        "meta": meta,
        "problems": names,
        "left_out": left_out,
        "tables": tables,
    }
    have = set(skeys)
    pairs = [
        pair_stats(runs, keys, f"hesse:{hm}", f"scipy:{sm}")
        for hm, sm in PAIRS
        if f"hesse:{hm}" in have and f"scipy:{sm}" in have
    ]
    best = {
        lib: best_of(tables["all"], lib)
        for lib in ("hesse", "scipy", "torchmin", "torch.optim")
        if any(s.startswith(lib + ":") for s in skeys)
    }
    if pairs:
        print_pairs(pairs, "hesse method (A) vs its scipy counterpart (B), all starts")
        for sc in scales:
            ks = [k for k in keys if k.endswith(f"@{sc:g}")]
            per = [pair_stats(runs, ks, p["a"], p["b"]) for p in pairs]
            print(
                f"  x{sc:g}: "
                + ", ".join(f"{p['a'].split(':')[1]} {p['solved_a']}-{p['solved_b']}" for p in per)
            )
        out["pairs"] = pairs
    if "hesse" in best and "scipy" in best:
        bp = pair_stats(runs, keys, best["hesse"], best["scipy"])
        print_pairs([bp], "best hesse method (A) vs best scipy method (B), by problems solved")
        out["best_pair"] = bp
    out["best_of_library"] = best
    print("\nbest of each library: " + ", ".join(f"{k}: {v}" for k, v in best.items()))

    rb = rosenbrock100(runs) if all(s.key in have for s in SOLVERS) else None
    if rb:
        print_rosenbrock100(rb)
        out["rosenbrock100"] = rb

    if all(f"hesse:{a}" in have and f"scipy:{b}" in have for a, b in PAIRS):
        sur = surprises(runs, keys)
        out["hesse_failed_scipy_solved"] = sur
        print(f"\nhesse failed where its scipy counterpart solved ({len(sur)} cases)")
        for x in sur:
            print(
                f"  {x['hesse']:<12} {x['problem']:<28} (scipy {x['scipy']}: "
                f"{x['scipy_evals']} evals) hesse: {x['end']}, {x['status']}: {x['message']} "
                f"(best f {fmt(x['hesse_best_f'], '.6g')}, {x['nfev']} evals)"
            )
    hesse_keys = [s for s in skeys if s.startswith("hesse:")]
    peer_keys = [s for s in skeys if not s.startswith("hesse:")]
    if hesse_keys and peer_keys:
        only_peers = {
            k: [s for s in peer_keys if runs[(s, k)]["solved_at"]]
            for k in keys
            if not any(runs[(s, k)]["solved_at"] for s in hesse_keys)
            and any(runs[(s, k)]["solved_at"] for s in peer_keys)
        }
        out["solved_by_a_peer_not_hesse"] = only_peers
        print(f"\nsolved by some peer but by no hesse method ({len(only_peers)})")
        for k, v in only_peers.items():
            print(f"  {k:<28} {', '.join(v)}")
        only_hesse = {
            k: [s for s in hesse_keys if runs[(s, k)]["solved_at"]]
            for k in keys
            if not any(runs[(s, k)]["solved_at"] for s in peer_keys)
            and any(runs[(s, k)]["solved_at"] for s in hesse_keys)
        }
        out["solved_by_hesse_not_a_peer"] = only_hesse
        print(f"solved by some hesse method but by no peer ({len(only_hesse)})")
        for k, v in only_hesse.items():
            print(f"  {k:<28} {', '.join(v)}")
    # hesse counts its own evaluations; they must agree with the counter's
    mismatched = [
        (r["solver"], f"{r['problem']}@{r['scale']:g}", r["nfev"], r["nfev_reported"])
        for r in runs.values()
        if r["solver"].startswith("hesse:") and r["end"] == "solver"
        if r["nfev"] != r["nfev_reported"]
    ]
    out["hesse_nfev_mismatches"] = mismatched
    print(
        f"\nhesse's own nfev differs from the counter's in {len(mismatched)} runs {mismatched[:5]}"
    )
    nobody = [k for k in keys if not any(runs[(s, k)]["solved_at"] for s in skeys)]
    out["solved_by_none"] = {k: unsolvable(runs, skeys, k) for k in nobody}
    if nobody:
        print(f"\nsolved by no solver ({len(nobody)}):")
        for k, v in out["solved_by_none"].items():
            print(
                f"  {k:<28} target f <= {v['target']:.12g}, best f of any solver "
                f"{fmt(v['best_f_any'], '.12g')}{'; ' + v['why'] if v['why'] else ''}"
            )

    RESULTS.mkdir(parents=True, exist_ok=True)
    if len(best) > 1 and "hesse" in best and "scipy" in best:
        out["figures"] = draw_profiles(runs, keys, best, stem, budget)
        print("\n" + "\n".join(f"wrote {p}" for p in out["figures"]))
    total = meta["total_seconds"]
    out["notes"] = [
        "evaluations = calls of the objective (f and its gradient together); Hessian-vector "
        "products and dense Hessians are not charged in the profile, reported apart",
        "solved_at = evaluations when f <= f_star + tau (f(x0) - f_star) was first met "
        "(counter wrapper), null if never within the budget",
        "pytorch-minimize's Hessian products are not counted (null)",
        "a start of all zeros is unchanged by scaling (watson)",
        "torch.set_num_threads(1), OPENBLAS_NUM_THREADS=1",
    ]
    out["runs"] = list(runs.values())
    path = stem.with_name(stem.name + ".json")
    path.write_text(json.dumps(finite_json(out), separators=(",", ":"), default=float))
    print(f"wrote {path} ({total:.0f} s of runs)")
    return 0


# == part (b): logistic regression =======================================================

LOGISTIC_TARGET = 1e-6
LAM = 1e-3


@dataclass
class Logistic:
    X: Tensor
    y: Tensor
    Xn: np.ndarray
    yn: np.ndarray
    g0_norm: float = field(init=False)
    f0: float = field(init=False)

    def __post_init__(self) -> None:
        f, g = self.value_grad(torch.zeros(self.n, dtype=torch.float64))
        self.f0, self.g0_norm = f, float(g.norm())

    @property
    def n(self) -> int:
        return self.X.shape[1]

    def fun(self, w: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            self.X @ w, self.y
        ) + 0.5 * LAM * torch.dot(w, w)

    def value_grad(self, w: Tensor) -> tuple[float, Tensor]:
        w = w.detach().to(torch.float64).clone().requires_grad_()
        f = self.fun(w)
        (g,) = torch.autograd.grad(f, w)
        return float(f.detach()), g


def make_logistic(n_samples: int) -> Logistic:
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n_samples, n_features=100, random_state=0)
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = y.astype(np.float64)
    return Logistic(torch.from_numpy(X), torch.from_numpy(y), X, y)


LogFn = Callable[[Logistic, Any], tuple[Tensor, dict]]


def lg_hesse(method: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        r = hesse.minimize(
            p.fun,
            torch.zeros(p.n, dtype=torch.float64),
            method,
            options={"gtol": 0.0, "grad_rtol": LOGISTIC_TARGET, "norm": 2},
        )
        return r.x, {"nit": r.nit, "nfev": r.nfev, "nhvp": r.nhvp, "status": r.status}

    return fn


def lg_scipy(method: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        second = method in ("Newton-CG", "trust-ncg")
        obj = ScipyObjective(p.fun, p.fun, keep_graph=second)
        kw = {"hessp": obj.hessp} if second else {}
        opts: dict[str, Any] = {"maxiter": 100000}
        if method == "Newton-CG":
            opts["xtol"] = setting
        elif method == "trust-ncg":
            opts["gtol"] = LOGISTIC_TARGET * p.g0_norm  # the target itself (2-norm)
        else:  # L-BFGS-B: projected gradient's inf-norm; no test on f
            opts.update(gtol=setting * p.g0_norm, ftol=0.0, maxfun=100000)
        r = scipy.optimize.minimize(
            obj.fg, np.zeros(p.n), method=method, jac=True, options=opts, **kw
        )
        return torch.from_numpy(r.x), {
            "nit": int(r.nit),
            "nfev": int(r.nfev),
            "status": str(r.message),
        }

    return fn


def lg_torch_lbfgs(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
    w = torch.zeros(p.n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=20000,
        max_eval=25000,
        tolerance_grad=setting * p.g0_norm,  # on the gradient's inf-norm
        tolerance_change=0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        f = p.fun(w)
        f.backward()
        return f

    opt.step(closure)
    st = opt.state[w]
    return w.detach(), {"nit": st.get("n_iter"), "nfev": st.get("func_evals")}


def lg_torchmin(method: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        import torchmin

        if method == "newton-cg":
            opts = {"xtol": setting}  # mean |step| per coordinate
        else:
            # no absolute tests on the step, f's change or the slope (see run_torchmin)
            opts = {
                "gtol": setting * p.g0_norm,
                "xtol": 0.0,
                "gtd_tol": 0.0,
                "history_size": 10,
            }
        r = torchmin.minimize(
            p.fun, torch.zeros(p.n, dtype=torch.float64), method=method, options=opts
        )
        return r.x.detach(), {"nit": int(r.nit), "nfev": int(r.nfev)}

    return fn


def lg_sklearn(solver: str) -> LogFn:
    def fn(p: Logistic, setting: Any) -> tuple[Tensor, dict]:
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(
            fit_intercept=False,
            C=1.0 / (p.X.shape[0] * LAM),
            solver=solver,
            tol=setting * p.g0_norm,  # on the gradient's inf-norm (of the same f)
            max_iter=100000,
        )
        m.fit(p.Xn, p.yn)
        return torch.from_numpy(m.coef_.ravel().copy()), {"nit": int(m.n_iter_[0])}

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
LOG_SOLVERS = [
    *(
        LogSolver(f"hesse:{m}", "hesse", lg_hesse(m))
        for m in ("newton-cg", "trust-ncg", "l-bfgs", "newton", "bfgs")
    ),
    LogSolver("scipy:Newton-CG", "scipy", lg_scipy("Newton-CG"), XTOL_LADDER, "xtol"),
    LogSolver("scipy:trust-ncg", "scipy", lg_scipy("trust-ncg")),
    LogSolver("scipy:L-BFGS-B", "scipy", lg_scipy("L-BFGS-B"), RELATIVE_LADDER, "gtol / ||g0||_2"),
    LogSolver(
        "torch.optim:LBFGS",
        "torch.optim",
        lg_torch_lbfgs,
        RELATIVE_LADDER,
        "tolerance_grad / ||g0||_2",
    ),
    LogSolver("torchmin:newton-cg", "torchmin", lg_torchmin("newton-cg"), XTOL_LADDER, "xtol"),
    LogSolver(
        "torchmin:l-bfgs", "torchmin", lg_torchmin("l-bfgs"), RELATIVE_LADDER, "gtol / ||g0||_2"
    ),
    LogSolver(
        "sklearn:newton-cg", "sklearn", lg_sklearn("newton-cg"), RELATIVE_LADDER, "tol / ||g0||_2"
    ),
    LogSolver("sklearn:lbfgs", "sklearn", lg_sklearn("lbfgs"), RELATIVE_LADDER, "tol / ||g0||_2"),
]


def lg_run(s: LogSolver, p: Logistic, setting: Any, limit: float) -> dict:
    """One run, timed end to end, then checked (outside the time) on our f. A run over
    ``limit`` seconds is stopped and reported as such."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning and the like
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                w, info = s.fn(p, setting)
        except RunTimeout:
            return {"ok": False, "error": f"over the {limit:g} s limit", "seconds": None}
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300], "seconds": None}
        secs = time.perf_counter() - t0
    f, g = p.value_grad(w)
    rel = float(g.norm()) / p.g0_norm
    return {"ok": rel <= LOGISTIC_TARGET, "rel_grad": rel, "f": f, "seconds": secs, **info}


def run_logistic(args: argparse.Namespace) -> int:
    torch.set_num_threads(DEFAULT_THREADS)
    n_samples = 10000 if args.quick else 200000
    rounds = 1 if args.quick else args.rounds
    solvers = [s for s in LOG_SOLVERS if not args.solvers or s.key in args.solvers]
    meta = metadata(
        DEFAULT_THREADS,
        {
            "part": "logistic",
            "n_samples": n_samples,
            "n_features": 100,
            "lambda": LAM,
            "target_rel_grad_2norm": LOGISTIC_TARGET,
            "rounds": rounds,
            "time_limit_s": args.time_limit_logistic,
        },
    )
    print(
        f"\ntorch {meta['torch']}, {meta['cpu']}, torch threads {DEFAULT_THREADS} (the "
        f"default), OPENBLAS_NUM_THREADS={meta['OPENBLAS_NUM_THREADS']}; "
        f"peers: {meta['peers']}"
    )
    start = time.perf_counter()
    p = make_logistic(n_samples)
    print(
        f"logistic regression: {n_samples} x 100, float64, lambda {LAM:g}; f(0) = {p.f0:.6f}, "
        f"||g(0)||_2 = {p.g0_norm:.4e}; target ||g||_2 <= {LOGISTIC_TARGET:g} ||g(0)||_2"
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
    for r in range(rounds):
        shift = r % max(len(timed), 1)
        for s in timed[shift:] + timed[:shift]:
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
    peers = [k for k, r in rows.items() if r["library"] != "hesse" and r["seconds"] is not None]
    best_peer = min(peers, key=lambda k: rows[k]["seconds"]) if peers else None
    for r in rows.values():
        r["ratio_to_best_peer"] = (
            r["seconds"] / rows[best_peer]["seconds"]
            if best_peer and r["seconds"] is not None
            else None
        )
    head = (
        f"{'solver':<20} {'seconds':>8} {'x best peer':>11} {'rel grad':>9} {'f':>18} "
        f"{'nit':>5} {'nfev':>5} {'setting':>9}  status"
    )
    print(
        f"\nLogistic regression, median of {rounds} interleaved rounds, torch threads "
        f"{DEFAULT_THREADS}\n{head}\n{'-' * len(head)}"
    )
    for k, r in rows.items():
        setting = r.get("setting")
        print(
            f"{k:<20} {fmt(r['seconds'], '8.3f')} {fmt(r['ratio_to_best_peer'], '11.2f')} "
            f"{fmt(r['rel_grad'], '9.1e')} {fmt(r['f'], '18.12f')} {fmt(r.get('nit'), '5')} "
            f"{fmt(r.get('nfev'), '5')} {fmt(setting, '9.0e')}  {r['status']}"
        )
    print(f"  best peer: {best_peer}")
    total = time.perf_counter() - start
    meta["total_seconds"] = total
    meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {
        "meta": meta,
        "problem": {"f0": p.f0, "g0_norm_2": p.g0_norm},
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
    suffix = "_quick" if args.quick else ""
    path = RESULTS / f"minimize_logistic{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_json(out), separators=(",", ":"), default=float))
    print(f"wrote {path} ({total:.0f} s)")
    return 0


# == driver ============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["profile", "logistic", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 1 min)")
    p.add_argument(
        "--time-limit", type=float, default=60.0, help="seconds per profile run (default 60)"
    )
    p.add_argument("--rounds", type=int, default=3, help="logistic timing rounds (default 3)")
    p.add_argument(
        "--time-limit-logistic",
        type=float,
        default=120.0,
        help="seconds per logistic run (default 120)",
    )
    p.add_argument(
        "--budget", type=int, default=BUDGET, help=f"evaluations per run (default {BUDGET})"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes for the profile, one torch thread each (default 2, or 1 on one "
        "core); counts do not depend on it, run times (and so the time limit) do",
    )
    p.add_argument("--problems", nargs="+", choices=sorted(FUNCTIONS), help="profile subset")
    p.add_argument("--solvers", nargs="+", help="subset of solver keys, e.g. hesse:bfgs")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="re-analyse the runs stored in a profile JSON (tables, figures, JSON) and exit",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.time_limit = min(args.time_limit, 5.0)
        args.budget = min(args.budget, QUICK_BUDGET)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    rc = 0
    if args.part in ("profile", "all"):
        rc |= run_profile(args)
    if args.part in ("logistic", "all"):
        rc |= run_logistic(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
