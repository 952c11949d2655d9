"""The summary of ``memory_budget.py`` (which describes the method): the median of the
repeats, the targets met at each size (:func:`verdicts`), and the tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from _harness import fmt, print_table
from _memory_budget_runs import BATCH, CONFIGS, TOL

AGREE_PEER = 1e-2  # hesse's eigenvalue against PyHessian's (relative)
AGREE_BUDGETS = 1e-5  # hesse's eigenvalues under different budgets (relative)
MiB = 2**20
BUDGET_256M = 256 * MiB


def median_run(runs: list[dict]) -> dict:
    row = dict(runs[0])
    for k in ("seconds", "extra_peak_bytes"):
        row[k] = statistics.median(r[k] for r in runs)
    row["seconds_all"] = [round(r["seconds"], 3) for r in runs]
    row["extra_peak_bytes_all"] = [r["extra_peak_bytes"] for r in runs]
    return row


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def verdicts(results: dict[int, dict[str, dict]]) -> dict:
    sizes = sorted(results)
    per_size: dict[int, dict] = {}
    for n in sizes:
        rows, v = results[n], {}
        pyh = rows.get("pyhessian")
        lams = [rows[k]["eigenvalue"] for k in CONFIGS if k != "pyhessian" and k in rows]
        if lams:
            v["hesse_budgets_spread"] = (max(lams) - min(lams)) / abs(lams[0])
            v["hesse_budgets_agree"] = v["hesse_budgets_spread"] <= AGREE_BUDGETS
        if pyh and lams:
            v["vs_pyhessian_rel"] = max(rel(lam, pyh["eigenvalue"]) for lam in lams)
            v["agree_with_pyhessian"] = v["vs_pyhessian_rel"] <= AGREE_PEER
        mid = rows.get("hesse_256M")
        if pyh and mid:
            limit = 1.2 * (pyh["extra_peak_bytes"] + BUDGET_256M)
            v["memory_256M_limit_bytes"] = limit
            v["memory_256M_met"] = mid["extra_peak_bytes"] <= limit
            v["time_256M_ratio"] = mid["seconds"] / pyh["seconds"]
            v["time_256M_met"] = v["time_256M_ratio"] <= 1.0
        full = rows.get("hesse_default")
        if pyh and full:
            v["time_default_ratio"] = full["seconds"] / pyh["seconds"]
            v["default_all_cached"] = not full.get("recomputed", True)
            v["time_default_met"] = v["time_default_ratio"] <= 0.6
        per_size[n] = v
    mids = [
        results[n]["hesse_256M"]["extra_peak_bytes"] for n in sizes if "hesse_256M" in results[n]
    ]

    def every(flag: str, where: Callable[[dict], bool] = lambda v: True) -> bool | None:
        """Whether ``flag`` holds at every size that has it (None: no size has it)."""
        got = [v[flag] for v in per_size.values() if flag in v and where(v)]
        return all(got) if got else None

    agree = [every("hesse_budgets_agree"), every("agree_with_pyhessian")]
    summary = {
        "memory_256M_met_every_size": every("memory_256M_met"),
        "memory_256M_growth_largest_over_smallest": mids[-1] / mids[0] if len(mids) > 1 else None,
        "time_256M_met_every_size": every("time_256M_met"),
        "time_default_met_every_size": every(
            "time_default_met", lambda v: v.get("default_all_cached", False)
        ),
        "eigenvalues_agree": None if None in agree else all(agree),
    }
    return {"per_size": per_size, **summary}


def report(results: dict[int, dict[str, dict]], device: torch.device) -> None:
    columns = [
        ("N", "5d"),
        ("configuration", "<14"),
        ("extra MiB", "9.1f"),
        ("s", "7.2f"),
        ("x PyH", "6.2f"),
        ("products", "8d"),
        ("cached", ">7"),
        ("eigenvalue", "12.7g"),
        ("certified", "9.1e"),
    ]
    rows = []
    for n in sorted(results):
        pyh = results[n].get("pyhessian")
        for key, r in results[n].items():
            rows.append(
                [
                    n,
                    CONFIGS[key][0],
                    r["extra_peak_bytes"] / MiB,
                    r["seconds"],
                    r["seconds"] / pyh["seconds"] if pyh else None,
                    r["products"],
                    f"{r['cached_batches']}/{n // BATCH}" if "cached_batches" in r else "-",
                    r["eigenvalue"],
                    r.get("certified_rel_error"),
                ]
            )
    what = "CUDA allocator" if device.type == "cuda" else "RSS"
    print_table(
        f"Top eigenvalue (tol {TOL:g}), extra peak memory ({what}) and wall time", columns, rows
    )


def print_verdicts(v: dict) -> None:
    print("\nTargets")
    for n, t in v["per_size"].items():
        parts = []
        if "memory_256M_met" in t:
            limit = t["memory_256M_limit_bytes"] / MiB
            parts.append(f"256M memory <= {limit:.0f} MiB: {t['memory_256M_met']}")
            parts.append(f"256M time x{t['time_256M_ratio']:.2f} <= 1.0: {t['time_256M_met']}")
        if "time_default_ratio" in t:
            parts.append(
                f"default time x{t['time_default_ratio']:.2f} <= 0.6: {t['time_default_met']}"
                + ("" if t["default_all_cached"] else " (not all cached)")
            )
        if "hesse_budgets_spread" in t:
            parts.append(f"budgets spread {t['hesse_budgets_spread']:.1e}")
        if "vs_pyhessian_rel" in t:
            parts.append(f"vs PyHessian {t['vs_pyhessian_rel']:.1e}")
        print(f"  N={n}: " + "; ".join(parts))
    g = v["memory_256M_growth_largest_over_smallest"]
    print(
        f"  256M memory at every size: {v['memory_256M_met_every_size']} (largest / smallest N: "
        f"{fmt(g, '.2f')}); 256M time at every size: {v['time_256M_met_every_size']}; default "
        f"time where all cached: {v['time_default_met_every_size']}; eigenvalues agree: "
        f"{v['eigenvalues_agree']}"
    )
