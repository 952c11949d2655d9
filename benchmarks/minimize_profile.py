"""How many of the classic test functions does each solver solve, and with how many
evaluations? ``hesse.minimize`` against scipy, pytorch-minimize and ``torch.optim.LBFGS``
(the performance profile; ``minimize.py --part profile`` runs the same).

Every problem of :data:`hesse.problems.FUNCTIONS` (the Moré-Garbow-Hillstrom
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

Run (from the repository root, after ``make bench-deps``)::

    .venv/bin/python benchmarks/minimize_profile.py            # 12 min on 2 cores (--jobs 2)
    .venv/bin/python benchmarks/minimize_profile.py --quick    # < 1 min

The problems run in ``--jobs`` processes (default 2, one torch thread each): the counts do
not depend on it, the run times do. ``--replot JSON`` redoes the tables, figures and
summaries from the runs stored in a profile JSON without running anything. ``--quick`` runs
3 problems from 2 start scales with a budget of 1000 evaluations and 5 s per run; its files
get ``_quick`` in their names. The solvers' runs are in ``_minimize_runs.py``, the tables
in ``_minimize_report.py``, the figures in ``_minimize_figures.py``.
"""

from __future__ import annotations

import os

# Before numpy/scipy load OpenBLAS: one BLAS thread for scipy (and sklearn's numpy).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _harness import RESULTS, finish, machine, print_header, write_json
from _minimize_cases import print_coverage, print_surprises
from _minimize_figures import draw_profiles
from _minimize_report import (
    best_of,
    pair_stats,
    print_pairs,
    print_rosenbrock100,
    print_solved,
    rosenbrock100,
    solved_table,
)
from _minimize_runs import (
    GRAD_RTOL,
    MW_TAU,
    PAIRS,
    SOLVERS,
    make_instance,
    profile_task,
)
from hesse.problems import FUNCTIONS

BUDGET = 5000  # evaluations per run
QUICK_BUDGET = 1000
SCALES = (1.0, 10.0, 100.0)
QUICK_PROBLEMS = ("rosenbrock", "beale", "rosenbrock-100")
PEER_DISTS = ("scipy", "pytorch-minimize", "matplotlib")


def run_profile(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    budget = args.budget
    names = list(QUICK_PROBLEMS) if args.quick else list(FUNCTIONS)
    if args.problems:
        names = args.problems
    scales = (1.0, 10.0) if args.quick else SCALES
    limit = args.time_limit
    solvers = [s for s in SOLVERS if not args.solvers or s.key in args.solvers]
    meta = {
        **machine("cpu", PEER_DISTS),
        "part": "profile",
        "dtype": "float64",
        "budget": budget,
        "jobs": args.jobs,
        "more_wild_tau": MW_TAU,
        "grad_rtol": GRAD_RTOL,
        "time_limit_s": limit,
        "scales": scales,
    }
    print_header(meta)
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
    finish(meta, start)
    out = getattr(args, "out", None)
    stem = (
        out.with_suffix("")
        if out
        else RESULTS / f"minimize_profile{'_quick' if args.quick else ''}"
    )
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
        out["hesse_failed_scipy_solved"] = print_surprises(runs, keys)
    out.update(print_coverage(runs, keys, skeys))

    stem.parent.mkdir(parents=True, exist_ok=True)
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
    write_json(stem.with_name(stem.name + ".json"), out, compact=True)
    print(f"({total:.0f} s of runs)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the profile (``minimize.py`` takes them too)."""
    p.add_argument(
        "--time-limit", type=float, default=60.0, help="seconds per profile run (default 60)"
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
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="re-analyse the runs stored in a profile JSON (tables, figures, JSON) and exit",
    )


def quick_settings(args: argparse.Namespace) -> None:
    if args.quick:
        args.time_limit = min(args.time_limit, 5.0)
        args.budget = min(args.budget, QUICK_BUDGET)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 1 min)")
    p.add_argument("--solvers", nargs="+", help="subset of solver keys, e.g. hesse:bfgs")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    add_arguments(p)
    args = p.parse_args(argv)
    quick_settings(args)
    if args.replot:
        return replot(args.replot)
    return run_profile(args)


if __name__ == "__main__":
    sys.exit(main())
