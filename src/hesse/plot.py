"""Figures of curvature analyses with matplotlib (the ``cli`` extra): the spectral
density, the top eigenvalues and the per-layer report. Each function draws on ``ax`` (or a
new figure), saves a PNG when ``path`` is given, and returns the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hesse.analysis import LayerReport
from hesse.linalg import DensityResult, EigenResult


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("hesse.plot needs matplotlib: pip install 'hesse[cli]'") from err
    return plt


def _figure(ax: Any, size=(6.4, 4.0)):
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    else:
        fig = ax.figure
    return fig, ax


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)


def spectral_density(
    result: DensityResult,
    *,
    ax: Any = None,
    path: str | Path | None = None,
    title: str = "Spectral density of the Hessian",
    label: str | None = None,
    floor: float = 1e-8,
) -> Any:
    """The density (log scale, floored at ``floor`` times its peak) against the eigenvalue."""
    fig, ax = _figure(ax)
    grid = result.grid.detach().cpu().double().numpy()
    dens = result.density.detach().cpu().double().numpy()
    dens = np.maximum(dens, floor * dens.max())
    ax.semilogy(grid, dens, label=label)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if label:
        ax.legend(loc="upper right")
    _save(fig, path)
    return fig


def eigenvalues(
    result: EigenResult,
    *,
    ax: Any = None,
    path: str | Path | None = None,
    title: str = "Top eigenvalues of the Hessian",
    label: str | None = None,
) -> Any:
    """The eigenvalues by rank, with their certified residuals as error bars."""
    fig, ax = _figure(ax)
    lam = result.eigenvalues.detach().cpu().double().numpy()
    res = result.residuals.detach().cpu().double().numpy()
    ranks = np.arange(1, lam.size + 1)
    ax.errorbar(ranks, lam, yerr=res, fmt="o-", capsize=3, label=label)
    if (lam > 0).all() and lam.max() / max(lam.min(), 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("rank i")
    ax.set_ylabel("eigenvalue λᵢ")
    ax.set_xticks(ranks)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend(loc="upper right")
    _save(fig, path)
    return fig


def layer_report(
    report: LayerReport, *, path: str | Path | None = None, title: str = "Curvature per layer"
) -> Any:
    """Per block: the top eigenvalue and the trace (log scale), and the smallest eigenvalue
    (symmetric log scale, so that negative curvature shows)."""
    plt = _pyplot()
    names = [r.name for r in report.rows]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    top = np.array([r.top_eigenvalue for r in report.rows])
    tr = np.array([r.trace for r in report.rows])
    ax1.bar(x - 0.2, np.abs(top), 0.4, label="top eigenvalue |λ_max|")
    ax1.bar(x + 0.2, np.abs(tr), 0.4, label="|trace|")
    ax1.set_yscale("log")
    ax1.set_ylabel("value (log scale)")
    ax1.legend(loc="best")
    low = np.array([r.min_eigenvalue for r in report.rows])
    ax2.bar(x, low, 0.5, color=["tab:red" if v < 0 else "tab:green" for v in low])
    ax2.set_yscale("symlog", linthresh=max(1e-12, float(np.abs(low).max()) * 1e-4))
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_ylabel("smallest eigenvalue λ_min (symlog)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlabel("parameter block")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    return fig
