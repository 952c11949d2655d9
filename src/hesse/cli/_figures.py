"""The command's figures (matplotlib, the ``cli`` extra). Each function draws one PNG and
returns the data it plotted, for the figure's JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hesse.cli._common import need


def _plt() -> Any:
    matplotlib = need("matplotlib")
    matplotlib.use("Agg", force=False)
    return need("matplotlib.pyplot")


def _log_if_decades(ax: Any, values: Any, label: str, span: float = 10.0) -> str:
    """A log y-axis where positive values span more than ``span`` (a decade by default);
    the label says so."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and v.max() / v.min() > span:
        ax.set_yscale("log")
        return f"{label} (log scale)"
    return label


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def convergence(results: dict[str, Any], path: Path, title: str) -> dict[str, Any]:
    """f − f* against iterations and against time, and the gradient norm against time,
    one line per method (log scales)."""
    plt = _plt()
    f_star = results["f_star"]
    floor = np.finfo(np.float64).eps * max(abs(f_star), 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    data: dict[str, Any] = {"f_star": f_star, "floor": floor, "methods": {}}
    tiny = np.finfo(np.float64).tiny
    for i, (m, d) in enumerate(results["methods"].items()):
        h = d["history"]
        gap = np.maximum(np.asarray(h["fun"], dtype=float) - f_star, floor)
        t = np.maximum(np.asarray(h["time"], dtype=float), 1e-4)
        grad = np.asarray(h["grad_norm"], dtype=float)
        # ten colours, then the same colours dashed: every method of minimize tells apart
        style = {"label": m, "lw": 1.5, "color": f"C{i % 10}", "ls": "-" if i < 10 else "--"}
        axes[0].plot(h["nit"], gap, **style)
        axes[1].plot(t, gap, **style)
        axes[2].plot(t, np.maximum(grad, tiny), **style)
        data["methods"][m] = {
            "iteration": h["nit"],
            "time_s": h["time"],
            "gap": gap,
            "grad_norm": grad,
        }
    axes[2].set_yscale("log")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("wall-clock time (s, log scale)")
    axes[2].set_ylabel("‖∇f(x)‖∞  (log scale)")
    axes[2].grid(True, which="major", alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.set_ylabel("f(x) − f*  (log scale)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=10)
    axes[0].set_xlim(left=0)
    axes[0].set_xlabel("iteration (linear to 10, log beyond)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("wall-clock time (s, log scale)")
    axes[0].text(0.01, floor * 2, "rounding level of f*", color="grey", fontsize=8,
                 transform=axes[0].get_yaxis_transform())  # fmt: skip
    axes[0].legend(loc="upper right", fontsize=8, framealpha=0.9)
    which = "the known minimum" if results.get("f_star_source") == "known" else "best value found"
    fig.suptitle(f"{title}  (f* = {f_star:.10g}, {which})")
    _save(fig, path)
    return data


def training(results: dict[str, Any], path: Path, title: str, metric: str) -> dict[str, Any]:
    """Training loss (log scale) and test metric against training time, per optimizer."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    data: dict[str, Any] = {"metric": metric, "methods": {}}
    floor = results.get("loss_floor", 0.0)
    data["loss_floor"] = floor
    losses: list[float] = []
    errors: list[float] = []
    for m, d in results["methods"].items():
        c = d["curve"]
        ax1.plot(c["time"], np.asarray(c["loss"]) - floor, label=m, lw=1.5)
        if c["test"]:
            ax2.plot(c["time"], 1 - np.asarray(c["test"]), label=m, lw=1.5)
            errors += [1 - v for v in c["test"]]
        data["methods"][m] = c
        losses += [v - floor for v in c["loss"]]
    what = "training loss" if not floor else f"training loss − its infimum {floor:.4g}"
    ax1.set_ylabel(_log_if_decades(ax1, losses, what))
    error = "test error (1 − accuracy)" if metric == "accuracy" else f"1 − test {metric}"
    ax2.set_ylabel(_log_if_decades(ax2, [e for e in errors if e > 0], error))
    for ax in (ax1, ax2):
        ax.set_xlabel("training time (s)")
        ax.grid(True, which="major", alpha=0.3)
    ax1.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax2.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(title)
    _save(fig, path)
    return data


FLOOR = 1e-5


def densities(curves: dict[str, Any], path: Path, title: str) -> dict[str, Any]:
    """One panel per spectral density (log density against the eigenvalue)."""
    import hesse.plot

    plt = _plt()
    n = len(curves)
    fig, axes = plt.subplots(
        1, n, figsize=(4.2 * n, 3.8), constrained_layout=True, sharey=True, squeeze=False
    )
    data = {}
    bottom = 0.0
    for ax, (label, density) in zip(axes[0], curves.items()):
        # floored at 1e-5 of the peak: an isolated eigenvalue's bump (about 1/P of the
        # mass) stays in view, the kernel's far tails do not stretch the axis
        hesse.plot.spectral_density(density, ax=ax, title=label, floor=FLOOR)
        ax.set_xlabel("eigenvalue λ of the Hessian")
        ax.axvline(0.0, color="black", lw=0.8, ls=":")
        data[label] = {"eigenvalue": density.grid, "density": density.density}
        bottom = max(bottom, 2 * FLOOR * float(density.density.max()))
    axes[0][0].set_ylim(bottom=bottom)  # below it lies only the floor, not density
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.suptitle(title)
    _save(fig, path)
    return data


def eigenvalues(
    curves: dict[str, Any],
    path: Path,
    title: str,
    ylabel: str,
    line: tuple[float, str] | None = None,
    gap: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """Eigenvalues by rank, one line per set (log scale when positive and spanning two
    decades), with an optional horizontal reference ``line=(value, label)`` and a
    vertical one between ranks, ``gap=(rank, label)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    data = {}
    every = []
    for label, values in curves.items():
        v = np.asarray(values, dtype=float)
        ranks = np.arange(1, v.size + 1)
        ax.plot(ranks, v, "o-", ms=3, lw=1.2, label=label)
        data[label] = {"rank": ranks, "eigenvalue": v}
        every += list(v)
    if line is not None:
        ax.axhline(line[0], color="grey", ls="--", lw=1, label=line[1])
    if gap is not None:
        ax.axvline(gap[0], color="grey", ls=":", lw=1, label=gap[1])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("rank i (1 = largest)")
    ax.set_ylabel(_log_if_decades(ax, every, ylabel, span=100.0))
    ax.grid(True, which="major", alpha=0.3)
    if len(curves) > 1 or line is not None or gap is not None:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_title(title)
    _save(fig, path)
    return data
