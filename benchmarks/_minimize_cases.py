"""The cases of the performance profile (``minimize_profile.py``) where some solver
failed: a hesse method failing a problem that its scipy counterpart solved, the problems
that only hesse or only the peers solved, and what is known of those that no solver solved.

``runs`` maps ``(solver key, "problem@scale")`` to the record of :func:`_minimize_runs.run_one`.
"""

from __future__ import annotations

import math
from typing import Any

from _harness import fmt
from _minimize_runs import PAIRS
from hesse.problems import FUNCTIONS


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


def print_surprises(runs: dict, keys: list[str]) -> list[dict]:
    """Print and return :func:`surprises`."""
    sur = surprises(runs, keys)
    print(f"\nhesse failed where its scipy counterpart solved ({len(sur)} cases)")
    for x in sur:
        print(
            f"  {x['hesse']:<12} {x['problem']:<28} (scipy {x['scipy']}: "
            f"{x['scipy_evals']} evals) hesse: {x['end']}, {x['status']}: {x['message']} "
            f"(best f {fmt(x['hesse_best_f'], '.6g')}, {x['nfev']} evals)"
        )
    return sur


def solved_only_by(runs: dict, keys: list[str], these: list[str], others: list[str]) -> dict:
    """The problems some solver of ``these`` solved and none of ``others``: who solved each."""
    return {
        k: [s for s in these if runs[(s, k)]["solved_at"]]
        for k in keys
        if not any(runs[(s, k)]["solved_at"] for s in others)
        and any(runs[(s, k)]["solved_at"] for s in these)
    }


def print_only(title: str, only: dict) -> None:
    print(f"{title} ({len(only)})")
    for k, v in only.items():
        print(f"  {k:<28} {', '.join(v)}")


def print_coverage(runs: dict, keys: list[str], skeys: list[str]) -> dict:
    """Print and return who alone solved what, hesse's own counts against the counter's, and
    the problems no solver solved (the result file's entries of those names)."""
    out: dict[str, Any] = {}
    hesse_keys = [s for s in skeys if s.startswith("hesse:")]
    peer_keys = [s for s in skeys if not s.startswith("hesse:")]
    if hesse_keys and peer_keys:
        only = out["solved_by_a_peer_not_hesse"] = solved_only_by(runs, keys, peer_keys, hesse_keys)
        print_only("\nsolved by some peer but by no hesse method", only)
        only = out["solved_by_hesse_not_a_peer"] = solved_only_by(runs, keys, hesse_keys, peer_keys)
        print_only("solved by some hesse method but by no peer", only)
    # hesse counts its own evaluations; they must agree with the counter's
    mismatched = [
        (r["solver"], f"{r['problem']}@{r['scale']:g}", r["nfev"], r["nfev_reported"])
        for r in runs.values()
        if r["solver"].startswith("hesse:") and r["end"] == "solver"
        if r["nfev"] != r["nfev_reported"]
    ]
    out["hesse_nfev_mismatches"] = mismatched
    print(
        f"\nhesse's own nfev differs from the counter's in {len(mismatched)} runs {mismatched[:5]}"
    )
    nobody = [k for k in keys if not any(runs[(s, k)]["solved_at"] for s in skeys)]
    out["solved_by_none"] = {k: unsolvable(runs, skeys, k) for k in nobody}
    if nobody:
        print(f"\nsolved by no solver ({len(nobody)}):")
        for k, v in out["solved_by_none"].items():
            print(
                f"  {k:<28} target f <= {v['target']:.12g}, best f of any solver "
                f"{fmt(v['best_f_any'], '.12g')}{'; ' + v['why'] if v['why'] else ''}"
            )
    return out
