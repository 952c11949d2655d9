"""The tables and figures of the performance profile (``minimize_profile.py``): problems
solved per solver, each hesse method against its scipy counterpart, the best method of each
library, Dolan-Moré performance profiles, Rosenbrock-100 in detail, and the cases where a
hesse method failed a problem its scipy counterpart solved.

``runs`` maps ``(solver key, "problem@scale")`` to the record of :func:`_minimize_runs.run_one`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _harness import median, print_table
from _minimize_runs import MW_TAU, PAIRS, SOLVERS
from hesse.problems import FUNCTIONS


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
