"""Second order on tall data: L2-regularised logistic regression, every solver side by side.

Two problems from :func:`hesse.problems.synthetic_logistic` (seeded, float64, ``d = 100``
features plus an intercept, ``lambda = 1/n`` on the weights: scikit-learn's
``LogisticRegression(C=1)``), from zero, to the target

    ||grad f(x)||_2 <= 1e-6 ||grad f(0)||_2:

* **independent**: ``n`` samples (default 200,000) of independent standard features;
* **correlated**: ``n / 2`` samples (default 100,000) of AR(1) features with correlation
  0.999 between neighbours (the covariance's condition number is 4e6; first-order methods
  take thousands of iterations).

Solvers, each at its best setting (several are tried in an untimed calibration round, the
fastest that reaches the target is kept), then timed twice, best of the two:

* ``scipy.optimize.minimize(method="L-BFGS-B")`` on torch's value and gradient;
* scikit-learn ``LogisticRegression(solver="lbfgs" | "newton-cg")``: its ``tol`` is a
  gradient inf-norm, so the loosest of ``target * (1, 1/3, 1/10)`` that reaches the 2-norm
  target is kept (``||g||_2 <= sqrt(P) ||g||_inf``: the last always does, unless its own
  test on the change of ``f`` stops it first);
* ``torch.optim.LBFGS`` (strong Wolfe; history 10 or 100);
* ``hesse.minimize`` with ``l-bfgs`` (memory 10, 30 or 100), ``newton-cg`` and
  ``trust-ncg`` (its own test is the target: ``options={"gtol": 0, "grad_rtol": 1e-6,
  "norm": 2}``);
* ``hesse.optim.SubsampledNewton`` on ``nn.Linear(d, 1)`` (``curvature="ggn"``, the
  Hessian of a logistic regression; dense subsampled curvature solved by Cholesky; a few
  subsample sizes and growth rates);
* ``hesse.minimize(FiniteSum, method="subsampled-newton")`` (``minimize-ssn``) on the
  problem's own objective, :meth:`hesse.problems.Problem.objective` (two of the same
  settings and a fixed 10% subsample, each with its phases on growing samples,
  ``gradient_sample="auto"``, or without, ``None``; the target as an absolute ``gtol``
  and no saddle check: ``_logistic_solvers.hesse_finite_sum`` says why); and the same
  with ``precision="mixed"`` (``minimize-ssn-mixed``: the whole method first on a float32
  copy of the data, then float64 from its point; the float32 copy is made inside the
  timed call).

Same target, measured the same way: where the benchmark calls the objective (scipy,
torch.optim, SubsampledNewton), the run ends at the first evaluation whose gradient meets
the target, and the point is the one evaluated; scikit-learn and ``hesse.minimize`` stop by
their own tests. Every run is then checked, outside the timing, by the 2-norm of the
gradient of the benchmark's own ``f`` at the returned point; a run that misses the target
or passes the time limit (``--time-limit``, 90 s) is reported as such, not as a time.

Threads. torch uses ``--threads`` (default 2); numpy's OpenBLAS (scikit-learn's products)
is set to the same number through ``OPENBLAS_NUM_THREADS`` before numpy loads, unless the
environment sets it (the value is recorded). scipy's L-BFGS-B here spends its time in
torch's products, so it follows torch's threads. Set ``OPENBLAS_NUM_THREADS=1`` yourself to
compare with ``benchmarks/minimize.py``, which runs numpy on one thread.

Run (from the repository root; the machine should be otherwise idle)::

    .venv/bin/python benchmarks/logistic.py             # full size: ~20 min on 2 cores
    .venv/bin/python benchmarks/logistic.py --quick     # n = 20,000: ~1 min
    .venv/bin/python benchmarks/logistic.py --n 50000 --solvers hesse:subsampled-newton

Results: a table per problem, and ``benchmarks/results/logistic.json`` (``_quick`` or
``_n<N>`` in the name for other sizes) with the machine, versions, load average and every
run.
"""

from __future__ import annotations

import os
import sys

_THREADS = 2
for _i, _a in enumerate(sys.argv):  # before numpy loads OpenBLAS: its thread count
    if _a == "--threads" and _i + 1 < len(sys.argv):
        _THREADS = int(sys.argv[_i + 1])
    elif _a.startswith("--threads="):
        _THREADS = int(_a.split("=", 1)[1])
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_THREADS))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from hesse.problems import synthetic_logistic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, finish, fmt, machine, print_header, print_table, write_json  # noqa: E402
from _logistic import TARGET, Logistic, checked_run, rank_by_best_peer  # noqa: E402
from _logistic_solvers import SEQUENTIAL_LADDER, SOLVERS, Solver  # noqa: E402

D = 100


def make(name: str, n: int) -> Logistic:
    p = synthetic_logistic(n, D, features=name, seed=0)
    X, y = p.train
    return Logistic(name, X, y[:, 0].contiguous(), p.l2, intercept=True, problem=p)


def run(s: Solver, lg: Logistic, setting: Any, limit: float) -> dict:
    """One run, timed end to end, then checked (outside the time) on our own f."""
    return checked_run(lambda: s.fn(lg, setting), lg, limit, slack=1e-9)


def run_problem(lg: Logistic, solvers: list[Solver], args: argparse.Namespace) -> dict:
    print(
        f"\n== {lg.name}: n = {lg.X.shape[0]}, d = {D} (+ intercept), lambda = 1/n; "
        f"f(0) = {lg.f0:.6f}, ||g(0)||_2 = {lg.g0:.4e}"
    )
    rows: dict[str, dict] = {}
    for s in solvers:
        tried = []
        for setting in s.settings:
            r = run(s, lg, setting, args.time_limit)
            tried.append({"setting": setting, **r})
            if r["ok"] and s.key in SEQUENTIAL_LADDER:
                break
        good = [t for t in tried if t["ok"]]
        best = min(good, key=lambda t: t["seconds"]) if good else None
        rows[s.key] = {"library": s.library, "setting_name": s.setting_name, "calibration": tried}
        if best is None:
            last = tried[-1]
            rows[s.key].update(
                status=last.get("error") or f"missed target (rel. grad {last['rel_grad']:.1e})",
                seconds=None,
            )
            print(f"  {s.key:<26} {rows[s.key]['status']}", flush=True)
            continue
        timed = [run(s, lg, best["setting"], args.time_limit) for _ in range(args.rounds)]
        ok = [t for t in timed if t["ok"]]
        rows[s.key].update(
            setting=best["setting"],
            timed=timed,
            status="reached target" if len(ok) == len(timed) else "missed target in a timed run",
            seconds=min(t["seconds"] for t in ok) if ok else None,
            rel_grad=max(t["rel_grad"] for t in timed if "rel_grad" in t),
            **{k: timed[-1].get(k) for k in ("nit", "nfev", "nhvp", "final_subsample")},
        )
        print(
            f"  {s.key:<26} {fmt(rows[s.key]['seconds'], '8.3f')} s  setting {best['setting']}",
            flush=True,
        )
    mine = [k for k, r in rows.items() if r["library"] == "hesse" and r["seconds"] is not None]
    best_peer = rank_by_best_peer(rows)
    best_hesse = min(mine, key=lambda k: rows[k]["seconds"]) if mine else None
    report(lg, rows, args.rounds)
    summary = {
        "best_peer": best_peer,
        "best_hesse": best_hesse,
        "hesse_best_over_best_peer": rows[best_hesse]["ratio_to_best_peer"] if best_hesse else None,
    }
    print(
        f"  best peer: {best_peer}; hesse's best: {best_hesse}, "
        f"{fmt(summary['hesse_best_over_best_peer'], '.2f')} x the best peer"
    )
    return {
        "n": lg.X.shape[0],
        "d": D,
        "lambda": lg.l2,
        "f0": lg.f0,
        "g0_norm_2": lg.g0,
        **summary,
        "solvers": rows,
    }


def report(lg: Logistic, rows: dict[str, dict], rounds: int) -> None:
    columns = [("solver", "<26"), ("seconds", "8.3f"), ("x best peer", "11.2f")]
    columns += [("rel grad", "9.1e"), ("nfev", "6"), ("status", "<")]
    shown = ("seconds", "ratio_to_best_peer", "rel_grad", "nfev", "status")
    print_table(
        f"{lg.name}, best of {rounds} timed runs",
        columns,
        [[k, *(r.get(c) for c in shown)] for k, r in rows.items()],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n",
        type=int,
        default=200_000,
        help="samples of the independent problem (the correlated one has n/2); default 200000",
    )
    p.add_argument("--quick", action="store_true", help="n = 20000, one timed run (~1 min)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs per solver (best of)")
    p.add_argument("--time-limit", type=float, default=90.0, help="seconds per run (90)")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenBLAS threads (2)")
    p.add_argument(
        "--problems",
        nargs="+",
        choices=["independent", "correlated"],
        default=["independent", "correlated"],
    )
    p.add_argument(
        "--solvers", nargs="+", choices=[s.key for s in SOLVERS], help="a subset of the solvers"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 20_000, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    solvers = [s for s in SOLVERS if not args.solvers or s.key in args.solvers]
    meta = {
        **machine("cpu", ("scipy", "scikit-learn")),
        "target_rel_grad_2norm": TARGET,
        "rounds": args.rounds,
        "time_limit_s": args.time_limit,
    }
    print_header(meta)
    start = time.perf_counter()
    out: dict[str, Any] = {"meta": meta, "problems": {}}
    for name in args.problems:
        n = args.n if name == "independent" else args.n // 2
        out["problems"][name] = run_problem(make(name, n), solvers, args)
    finish(meta, start)
    suffix = "_quick" if args.quick else "" if args.n == 200_000 else f"_n{args.n}"
    if args.solvers or len(args.problems) < 2:  # a part of the benchmark: its own file
        suffix += "_part"
    write_json(RESULTS / f"logistic{suffix}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
