"""The figures of the performance profile (``minimize_profile.py``): Dolan-Moré profiles of
hesse's and scipy's methods, and of the best method of each library.

``runs`` maps ``(solver key, "problem@scale")`` to the record of :func:`_minimize_runs.run_one`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _minimize_report import evals
from _minimize_runs import MW_TAU, SOLVERS


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


def tau_limit(ratios: dict[str, list[float]]) -> float:
    """The right end of a profile's axis: a power of 2 beyond the largest finite ratio."""
    finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
    return max(2.0, 2 ** math.ceil(math.log2(max(finite, default=2.0)) + 0.5))


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


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def draw_profiles(runs: dict, keys: list[str], best: dict, stem: Path, budget: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    hs = [s.key for s in SOLVERS if s.library == "hesse"]
    ss = [s.key for s in SOLVERS if s.library == "scipy"]
    ratios = profile_curves(runs, keys, hs + ss)
    tau_max = tau_limit(ratios)
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
    written.append(_save(fig, stem.with_name(stem.name + ".png")))

    tops = list(best.values())
    ratios = profile_curves(runs, keys, tops)
    tau_max = tau_limit(ratios)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {s: {"color": cmap(i), "lw": 2.0} for i, s in enumerate(tops)}
    plot_profile(ax, ratios, styles, tau_max)
    ax.legend(loc="lower right")
    ax.set_title(
        f"Best method of each library (most problems solved)\n{len(keys)} problems from starts "
        f"{starts}, budget {budget} evaluations; legend: (problems solved / problems)",
        fontsize=10,
    )
    written.append(_save(fig, stem.with_name(stem.name + "_best.png")))
    return written
