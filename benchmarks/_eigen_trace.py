"""The trace of the MLP's Hessian at equal budgets of products: hesse's Hutchinson, Hutch++
and XTrace against PyHessian's and curvlinops' estimators (the second question of
``eigen.py``, which describes the method).

The exact trace is the sum of BackPACK's exact Hessian diagonal in float64, checked on a
small network against the dense Hessian and on 16 coordinates against ``e_i^T H e_i``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import hesse
from _harness import print_table, quartiles, rotations, timed
from _models import Problem, hesse_operator
from _peers import (
    CURVLINOPS,
    PYHESSIAN,
    Counter,
    backpack_diag_hessian,
    curvlinops_hessian,
    hesse_counted,
    pyhessian_counted,
    pyhessian_session,
)

PYH, CURV = PYHESSIAN, CURVLINOPS


# -- the reference ---------------------------------------------------------------------


def reference_trace(pb64: Problem) -> dict:
    # 1. BackPACK against the dense Hessian of a small network of the same kind
    torch.manual_seed(1)
    small = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 10),
    ).double()
    Xs, ys = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 10, (64,))
    dense = hesse.HessianOperator(small, pb64.loss_fn, (Xs, ys)).to_dense()
    small_err = float(
        (backpack_diag_hessian(small, pb64.loss_fn, Xs, ys) - dense.diagonal()).norm()
        / dense.diagonal().norm()
    )
    # 2. the full problem
    start = time.perf_counter()
    diag = backpack_diag_hessian(pb64.model, pb64.loss_fn, pb64.X, pb64.y)
    seconds = time.perf_counter() - start
    # 3. a few coordinates against hesse's e_i^T H e_i
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(diag.numel(), generator=g)[:16]
    E = torch.zeros(diag.numel(), idx.numel(), dtype=torch.float64)
    E[idx, torch.arange(idx.numel())] = 1.0
    H = hesse_operator(pb64)
    exact = (H @ E)[idx, torch.arange(idx.numel())]
    coord_err = float((exact - diag[idx]).abs().max() / exact.abs().max())
    if not (small_err < 1e-10 and coord_err < 1e-8):
        raise RuntimeError(f"BackPACK's diagonal is off: {small_err:.1e}, {coord_err:.1e}")
    return {
        "trace": float(diag.sum()),
        "seconds": seconds,
        "check_small_network_rel_error": small_err,
        "check_16_coordinates_max_rel_error": coord_err,
        "how": "sum of BackPACK's exact Hessian diagonal (DiagHessian) in float64",
    }


# -- methods --------------------------------------------------------------------------


@dataclass
class TraceRun:
    estimate: float
    products: int
    stderr: float | None = None


def hesse_trace(method: str) -> Callable[[Problem, int, int], TraceRun]:
    def fn(pb: Problem, seed: int, budget: int) -> TraceRun:
        r = hesse.trace(hesse_operator(pb), method, num_matvecs=budget, seed=seed)
        return TraceRun(r.estimate, r.matvecs, r.stderr)

    return fn


def curvlinops_trace(name: str) -> Callable[[Problem, int, int], TraceRun]:
    def fn(pb: Problem, seed: int, budget: int) -> TraceRun:
        import curvlinops

        counter = Counter()
        op = curvlinops_hessian(pb, counter)
        torch.manual_seed(seed)  # its probes come from torch's global generator
        est = float(getattr(curvlinops, name)(op, budget))
        return TraceRun(est, counter.products)

    return fn


def pyhessian_trace(pb: Problem, seed: int, budget: int | None) -> TraceRun:
    """Hutchinson; ``budget=None`` runs its defaults (maxIter=100, tol=1e-3)."""
    counter = Counter()
    kw = {} if budget is None else {"maxIter": budget, "tol": -math.inf}
    with (
        pyhessian_counted(counter),
        pyhessian_session(pb.model, pb.loss_fn, (pb.X, pb.y), seed) as hc,
    ):
        values = hc.trace(**kw)
    return TraceRun(float(np.mean(values)), counter.products)


@dataclass(frozen=True)
class TraceMethod:
    key: str
    label: str
    fn: Callable[[Problem, int, int], TraceRun]
    package: str | None = None


TRACE_METHODS = [
    TraceMethod("hesse-hutchinson", "hesse Hutchinson", hesse_trace("hutchinson")),
    TraceMethod("hesse-hutch++", "hesse Hutch++", hesse_trace("hutch++")),
    TraceMethod("hesse-xtrace", "hesse XTrace", hesse_trace("xtrace")),
    TraceMethod("pyhessian", "PyHessian Hutchinson", pyhessian_trace, PYH),
    TraceMethod(
        "curvlinops-hutchinson", "curvlinops Hutchinson", curvlinops_trace("hutchinson_trace"), CURV
    ),
    TraceMethod(
        "curvlinops-hutch++", "curvlinops Hutch++", curvlinops_trace("hutchpp_trace"), CURV
    ),
    TraceMethod("curvlinops-xtrace", "curvlinops XTrace", curvlinops_trace("xtrace"), CURV),
]


def run_trace(pb: Problem, tr: float, seeds: list[int], budgets: list[int]) -> dict:
    methods = {m.key: m for m in TRACE_METHODS}
    _, counted = hesse_counted(lambda: hesse_trace("xtrace")(pb, 1000, budgets[0]))
    if counted != budgets[0]:
        raise RuntimeError(f"hesse's xtrace spent {counted} products of {budgets[0]}")
    for m in methods.values():  # warm-up
        m.fn(pb, 1000, budgets[0])
    rows = []
    for budget in budgets:
        print(f"  budget {budget} ...", flush=True)
        runs: dict[str, list[dict]] = {k: [] for k in methods}
        for r, order in rotations(list(methods), len(seeds)):
            for k in order:
                run, secs = timed(methods[k].fn, pb, seeds[r], budget)
                runs[k].append(
                    {
                        "seed": seeds[r],
                        "estimate": run.estimate,
                        "rel_error": abs(run.estimate - tr) / abs(tr),
                        "products": run.products,
                        "stderr": run.stderr,
                        "seconds": secs,
                    }
                )
        for k, rs in runs.items():
            errs, secs = [x["rel_error"] for x in rs], [x["seconds"] for x in rs]
            calib = [abs(x["estimate"] - tr) / x["stderr"] for x in rs if x["stderr"]]
            rows.append(
                {
                    "key": k,
                    "label": methods[k].label,
                    "package": methods[k].package,
                    "budget": budget,
                    "products_median": statistics.median(x["products"] for x in rs),
                    "rel_error_median": statistics.median(errs),
                    "rel_error_max": max(errs),
                    "error_over_stderr_median": statistics.median(calib) if calib else None,
                    "seconds_median": statistics.median(secs),
                    "seconds_quartiles": quartiles(secs),
                    "runs": sorted(rs, key=lambda x: x["seed"]),
                }
            )
    defaults = []
    for s in seeds:
        run, secs = timed(pyhessian_trace, pb, s, None)
        defaults.append(
            {
                "seed": s,
                "estimate": run.estimate,
                "rel_error": abs(run.estimate - tr) / abs(tr),
                "products": run.products,
                "seconds": secs,
            }
        )
    return {"rows": rows, "pyhessian_defaults": defaults}


TIE = 1.01  # median errors within 1% count as equal (same probes, float32 rounding)


def paired_ratio(a: dict, b: dict) -> float:
    """The median over seeds (rounds) of the ratio of a's time to b's in the same round."""
    tb = {x["seed"]: x["seconds"] for x in b["runs"]}
    return statistics.median(x["seconds"] / tb[x["seed"]] for x in a["runs"])


def trace_verdict(rows: list[dict], budgets: list[int]) -> dict:
    """Per budget, each hesse estimator against the peer with the smallest median error
    and the peer with the smallest median time (time compared round by round)."""
    out = {}
    for b in budgets:
        at = [r for r in rows if r["budget"] == b]
        peers = [r for r in at if r["package"]]
        best = min(peers, key=lambda r: r["rel_error_median"])
        fastest = min(peers, key=lambda r: r["seconds_median"])
        hesse_rows = {}
        for r in at:
            if r["package"]:
                continue
            ratio = paired_ratio(r, fastest)
            hesse_rows[r["key"]] = {
                "rel_error": r["rel_error_median"],
                "error_vs_best_peer": r["rel_error_median"] / best["rel_error_median"],
                "error_ok": r["rel_error_median"] <= TIE * best["rel_error_median"],
                "seconds": r["seconds_median"],
                "time_vs_fastest_peer": ratio,
                "time_ok": ratio <= 1.0,
            }
        out[str(b)] = {
            "best_peer": best["key"],
            "best_peer_rel_error": best["rel_error_median"],
            "fastest_peer": fastest["key"],
            "fastest_peer_seconds": fastest["seconds_median"],
            "hesse": hesse_rows,
        }
    return out


def print_trace(res: dict, tr: float, budgets: list[int], n_seeds: int) -> None:
    columns = [
        ("method", "<24"),
        ("budget", "6d"),
        ("prods", "5.0f"),
        ("rel.err", "8.1e"),
        ("max err", "8.1e"),
        ("err/se", "6.2f"),
        ("s", "7.3f"),
        ("[quartiles]", ">15"),
    ]
    rows = [
        [
            r["label"],
            r["budget"],
            r["products_median"],
            r["rel_error_median"],
            r["rel_error_max"],
            r["error_over_stderr_median"],
            r["seconds_median"],
            "[{:.3f}-{:.3f}]".format(*r["seconds_quartiles"]),
        ]
        for b in budgets
        for r in res["rows"]
        if r["budget"] == b
    ]
    print_table(f"Trace: exact {tr:.8g}; medians over {n_seeds} seeds", columns, rows)
    d = res["pyhessian_defaults"]
    print(
        f"PyHessian trace, defaults (maxIter=100, tol=1e-3): products "
        f"{statistics.median(x['products'] for x in d):.0f} (median), rel. error "
        f"{statistics.median(x['rel_error'] for x in d):.1e}, "
        f"{statistics.median(x['seconds'] for x in d):.3f} s"
    )


def print_verdict(verdict: dict) -> None:
    for b, t in verdict.items():
        print(
            f"  trace at {b}: best peer {t['best_peer']} {t['best_peer_rel_error']:.1e}, "
            f"fastest peer {t['fastest_peer']} {t['fastest_peer_seconds']:.3f} s"
        )
        for k, h in t["hesse"].items():
            print(
                f"    {k:<18} error {h['rel_error']:.1e} (x{h['error_vs_best_peer']:.2f}: "
                f"{'ok' if h['error_ok'] else 'worse'}), {h['seconds']:.3f} s "
                f"(x{h['time_vs_fastest_peer']:.2f} per round: "
                f"{'ok' if h['time_ok'] else 'slower'})"
            )
