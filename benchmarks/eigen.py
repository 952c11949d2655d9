"""Top eigenvalue and trace of a network's Hessian: hesse against its peers, in one run.

The problem is that of ``hvp_cost.py``: the Hessian of the mean cross-entropy of the MLP
64-256-256-10 (tanh) on a batch of 1024, float32, P = 85,002 parameters.

References, computed once per run in float64 on a float64 copy of the model:

* the top eigenvalue: hesse's Lanczos to a relative residual of 1e-12, its residual
  re-checked with an independent plain double-backward product; the second eigenvalue
  gives the relative gap, which is what makes power iteration slow here;
* the trace: exact, as the sum of BackPACK's exact Hessian diagonal (``DiagHessian``, exact
  for Linear/Tanh/cross-entropy), checked against the dense Hessian of a small network of
  the same kind and against hesse's ``e_i^T H e_i`` on a few random coordinates.

Top eigenvalue, to a relative error of 1e-3. Each peer runs with its defaults and with
the cheapest setting (in one parameter, chosen with hindsight) that reaches 1e-3 on every
seed: the largest ``tol`` of a ladder for PyHessian's power iteration (``maxIter=1000``),
hessian-eigenthings' power iteration (``max_iter=1000``) and scipy's ``eigsh(which="LA")``
on curvlinops' operator (``to_scipy()``, so ARPACK runs in float64 around float32
products), and the smallest ``max_iter`` for hessian-eigenthings' Lanczos (full
re-orthogonalisation), read off one long run per seed (a Lanczos run of m steps is a prefix
of a longer one). hesse runs ``hesse.eigenvalues(H, tol=1e-3)`` as it is: it stops when the
residual certifies the relative error. An "oracle" column gives the first product at which
the estimate was within 1e-3 (known only with the reference; from the ladder runs' Rayleigh
quotients for power iteration, from the Ritz values of the long run for Lanczos): what a
perfect stopping rule would have needed. The time target is checked against the fastest
peer that reaches 1e-3 on every seed, among the peers' defaults and among all settings.

Trace, at equal budgets of products (30, 90, 300): hesse's Hutchinson, Hutch++ and XTrace
against PyHessian's Hutchinson (``tol=-inf`` so that it spends the budget) and curvlinops'
``hutchinson_trace``, ``hutchpp_trace`` and ``xtrace`` (all products of a phase batched
through ``vmap``); PyHessian's defaults (``maxIter=100, tol=1e-3``) as one more row. From
the same seed, hesse's Hutchinson draws the same signs as PyHessian's (torch's Mersenne
Twister, one draw per sign), so that pair gives the same estimates: a paired comparison.
hessian-eigenthings' ``hutch_plus_plus`` is left out: it draws the same signs as hesse's
Hutch++, gives the same estimates, and applies one column at a time (the slowest here).
With 5 seeds, the median errors of two estimators differ by chance by tens of percent.

Products are counted by wrapping each library's product (PyHessian's
``hessian_vector_product``, the eigenthings operator's ``matvec``, the curvlinops operator's
``_matmat``, per column); hesse's own count is checked once against a wrapped
``LinearizedCurvature._matmat``. Before any timing every library's product is checked
against a float64 double-backward product (relative error below 1e-4). Each timed call
builds its operator (PyHessian's constructor, with its forward and backward, and hesse's
``linearize()`` are in the time). After one untimed warm-up call per method, the rounds are
interleaved: each seed is a round that runs every method once, in a rotating order. Tables
give medians over seeds (and the worst seed where it matters).

Run (from the repository root, after ``make bench-deps``; OPENBLAS_NUM_THREADS=1 keeps
scipy's ARPACK from competing with torch's two threads)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/eigen.py
    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/eigen.py --quick

The full run takes 5 to 6 minutes on 2 threads (the exact trace alone 10 to 30 s);
``--quick`` (2 seeds, budgets 30 and 90) about a minute and a half. The figures go to
``benchmarks/results/eigen_cpu.json`` (``_quick`` appended for ``--quick``).

The code: ``_eigen_top_methods.py`` and ``_eigen_top.py`` (the top eigenvalue: the methods;
the reference, tuning, rounds and verdict) and ``_eigen_trace.py`` (the trace); the peers'
adapters and counters are in ``_peers.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _eigen_top as top
import _eigen_trace as trace
from _harness import RESULTS, finish, machine, print_header, version, write_json
from _models import (
    Problem,
    float64_problem,
    hesse_operator,
    make_problem,
    references,
    rel_error,
)
from _peers import (
    CURVATURE_PEERS,
    Counter,
    curvlinops_hessian,
    eigenthings_hessian,
    pyhessian_session,
)

HVP_TOLERANCE = 1e-4  # of each library's product against the float64 reference


def check_products(pb: Problem) -> dict[str, float]:
    """Each library's H v against the float64 double-backward reference; raises if off."""
    from pyhessian.utils import hessian_vector_product

    ref = references(pb)["H"]
    counter = Counter()
    out = {
        "hesse": hesse_operator(pb).linearize() @ pb.v,
        "eigenthings": eigenthings_hessian(pb, counter).matvec(pb.v),
        "curvlinops": curvlinops_hessian(pb, counter) @ pb.v,
    }
    scipy_op = curvlinops_hessian(pb, counter).to_scipy()
    out["curvlinops-scipy"] = torch.from_numpy(scipy_op @ pb.v.double().numpy())
    with pyhessian_session(pb.model, pb.loss_fn, (pb.X, pb.y), 0) as hc:
        out["pyhessian"] = hessian_vector_product(hc.gradsH, hc.params, pb.v_list)
    errors = {k: rel_error(v, ref) for k, v in out.items()}
    bad = {k: e for k, e in errors.items() if not e < HVP_TOLERANCE}
    if bad:
        raise RuntimeError(f"wrong products (rel. error > {HVP_TOLERANCE:g}): {bad}")
    return errors


def metadata(args: argparse.Namespace) -> dict:
    return {
        **machine("cpu", ("scipy", *CURVATURE_PEERS)),
        "scipy": version("scipy"),
        "dtype": "float32 (references in float64)",
        "seeds": args.seeds,
        "budgets": args.budgets,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seeds", type=int, default=5, help="seeds (rounds) per method (default 5)")
    p.add_argument(
        "--budgets", type=int, nargs="+", default=[30, 90, 300], help="trace budgets (products)"
    )
    p.add_argument("--quick", action="store_true", help="2 seeds, budgets 30 and 90")
    p.add_argument("--skip-trace", action="store_true", help="only the top eigenvalue")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets = 2, [30, 90]
    bad = [b for b in args.budgets if b % 6]
    if bad:
        p.error(f"budgets must be multiples of 6 (Hutch++ needs thirds, XTrace halves): {bad}")
    if args.out is None:
        args.out = RESULTS / f"eigen_cpu{'_quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = metadata(args)
    print_header(meta)
    if meta["OPENBLAS_NUM_THREADS"] is None:
        print("  note: OPENBLAS_NUM_THREADS is not set; ARPACK's BLAS may compete with torch")
    start = time.perf_counter()
    pb = make_problem("mlp", torch.device("cpu"))
    pb64 = float64_problem(pb)
    P = pb.v.numel()
    print(f"MLP 64-256-256-10, tanh, batch {pb.X.shape[0]}, P = {P}, float32")
    hvp_errors = check_products(pb)
    print(
        "  products checked against float64: "
        + ", ".join(f"{k} {e:.1e}" for k, e in hvp_errors.items())
    )
    ref = top.reference_eigen(pb64)
    print(
        f"  reference: lambda_max {ref['lambda_max']:.10g}, lambda_2 {ref['lambda_2']:.10g}, "
        f"residual {ref['relative_residual']:.1e} ({ref['seconds']:.1f} s)"
    )
    seeds = list(range(args.seeds))
    eig = top.run_eigen(pb, ref["lambda_max"], seeds)
    eig["verdict"] = top.eigen_verdict(eig["rows"], len(seeds))
    top.print_eigen(eig["rows"], ref, len(seeds))
    out: dict[str, Any] = {
        "meta": meta,
        "problem": {
            "model": "MLP 64-256-256-10, tanh, cross-entropy (mean)",
            "batch": pb.X.shape[0],
            "params": P,
            "hvp_rel_errors": hvp_errors,
            "eigen_reference": ref,
        },
        "eigen": {"target_rel_error": top.TARGET, **eig},
    }
    if not args.skip_trace:
        print("\n  exact trace (BackPACK, float64) ...", flush=True)
        tref = trace.reference_trace(pb64)
        print(f"  trace {tref['trace']:.10g} ({tref['seconds']:.1f} s)")
        out["problem"]["trace_reference"] = tref
        res = trace.run_trace(pb, tref["trace"], seeds, args.budgets)
        res["verdict"] = trace.trace_verdict(res["rows"], args.budgets)
        trace.print_trace(res, tref["trace"], args.budgets, len(seeds))
        out["trace"] = {"budgets": args.budgets, **res}
    finish(meta, start)
    print("\nTargets")
    top.print_verdict(out["eigen"]["verdict"])
    trace.print_verdict(out.get("trace", {}).get("verdict", {}))
    out["notes"] = [
        "every timed call builds its operator; hesse's linearize() and PyHessian's "
        "constructor (forward and backward) are in the time",
        "curvlinops operators are built with check_deterministic=False and num_data given",
        "eigsh runs on curvlinops' to_scipy() (float64 ARPACK, float32 products)",
        "oracle: first product whose estimate is within the target, known only with the reference",
    ]
    write_json(args.out, out)
    print(f"({meta['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
