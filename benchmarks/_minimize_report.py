"""The tables of the performance profile (``minimize_profile.py``): problems solved per
solver, each hesse method against its scipy counterpart, the best method of each library,
and Rosenbrock-100 in detail (the figures are in ``_minimize_figures.py``, the cases
where some solver failed in ``_minimize_cases.py``).

``runs`` maps ``(solver key, "problem@scale")`` to the record of :func:`_minimize_runs.run_one`.
"""

from __future__ import annotations

import math

from _harness import median, print_table


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
    columns = [("solver", "<24"), ("solved", ">9"), ("median evals", "13.0f")]
    columns += [("errors", "7d"), ("timeouts", "9d")]
    rows = [
        [s, f"{r['solved']} / {r['problems']}", r["median_evals"], r["errors"], r["timeouts"]]
        for s, r in table.items()
    ]
    print_table(title, columns, rows)


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
    columns = [("A", "<18"), ("B", "<18"), ("solved A", "8d"), ("solved B", "8d")]
    columns += [("both", "5d"), ("med A", "7.0f"), ("med B", "7.0f"), ("med A/B", "8.2f")]
    columns += [("A fewer", "8d"), ("B fewer", "8d")]
    keys = ("a", "b", "solved_a", "solved_b", "both", "median_a", "median_b", "median_ratio")
    print_table(title, columns, [[p[k] for k in (*keys, "fewer_a", "fewer_b")] for p in pairs])


def best_of(table: dict, library: str) -> str:
    """The solver of a library that solved most problems (ties: fewer median evaluations)."""
    rows = [(s, r) for s, r in table.items() if s.startswith(library + ":")]
    return min(rows, key=lambda sr: (-sr[1]["solved"], sr[1]["median_evals"] or math.inf))[0]


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
    def end(r: dict) -> str:
        return r["end"] if r["end"] != "solver" else f"{r['status']}"

    columns = [("solver", "<22"), ("evals@solve", "11d"), ("HVPs@solve", "10d")]
    columns += [("evals", "6d"), ("HVPs", "6d"), ("s", "6.2f"), ("end", "<8")]
    print_table(
        "Rosenbrock-100 from the standard start (x1)",
        columns,
        [
            [s, *(r[k] for k in ("solved_at", "nhvp_at_solve", "nfev", "nhvp", "seconds")), end(r)]
            for s, r in rows.items()
        ],
    )
    print(
        "  evals@solve: evaluations when the Moré-Wild test was first met; HVPs: Hessian-vector "
        "products (hesse: at the end of that iteration; pytorch-minimize: not counted)"
    )
