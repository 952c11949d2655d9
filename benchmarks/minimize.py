"""``hesse.minimize`` against scipy, pytorch-minimize and ``torch.optim.LBFGS``: the two
questions of ``minimize_profile.py`` and ``minimize_logistic.py`` from one command line.

* ``--part profile``: how many of the classic test functions each solver solves, and with
  how many evaluations (Dolan-Moré profiles; Rosenbrock-100's Hessian-vector products in
  detail) -> ``benchmarks/results/minimize_profile.{json,png}``, ``minimize_profile_best.png``;
* ``--part logistic``: how long each solver takes to fit a 200,000 x 100 logistic
  regression to the same gradient norm -> ``benchmarks/results/minimize_logistic.json``;
* ``--part all`` (the default): both, in that order.

Each script's docstring describes its method. Run (from the repository root, after
``make bench-deps``)::

    .venv/bin/python benchmarks/minimize.py --part profile    # 12 min on 2 cores (--jobs 2)
    .venv/bin/python benchmarks/minimize.py --part logistic   # a few minutes
    .venv/bin/python benchmarks/minimize.py --quick           # both parts, small, < 1 min

``--replot JSON`` redoes the profile's tables, figures and summaries from the runs stored in
a profile JSON. ``--help`` lists the options.
"""

from __future__ import annotations

import os

# Before numpy/scipy load OpenBLAS: one BLAS thread for scipy (and sklearn's numpy).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import sys

import minimize_logistic
import minimize_profile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["profile", "logistic", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 1 min)")
    p.add_argument("--solvers", nargs="+", help="subset of solver keys, e.g. hesse:bfgs")
    minimize_profile.add_arguments(p)
    minimize_logistic.add_arguments(p)
    args = p.parse_args(argv)
    minimize_profile.quick_settings(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return minimize_profile.replot(args.replot)
    rc = 0
    if args.part in ("profile", "all"):
        rc |= minimize_profile.run_profile(args)
    if args.part in ("logistic", "all"):
        rc |= minimize_logistic.run_logistic(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
