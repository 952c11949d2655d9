"""The summary and the table of ``distributed.py`` (which describes the method): per task
and configuration, the median time of the slowest rank, the speed-up over one plain
process and the share of the machine's ceiling, with every configuration's answer checked
against the plain process's.
"""

from __future__ import annotations

import statistics

from _harness import quartiles


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    """Per task and configuration: every timed run (the slowest rank's seconds), their
    median and quartiles, the median time in collectives (median rank), and the speed-up
    as the ratio of medians against the single plain process."""
    table: dict = {}
    for key, launches in runs.items():
        for task in ("eigenvalue", "hessian_free_step"):
            per_launch = [
                [[r for r in rank["rows"] if r["task"] == task] for rank in ranks]
                for ranks in launches
            ]
            # the slowest rank's time of each run (for dist, every rank holds it already)
            seconds = [
                max(rank[i]["seconds"] for rank in ranks)
                for ranks in per_launch
                for i in range(len(ranks[0]))
            ]
            comm = [
                statistics.median(rank[i]["comm_seconds"] for rank in ranks)
                for ranks in per_launch
                for i in range(len(ranks[0]))
            ]
            entry = {
                "seconds": statistics.median(seconds),
                "quartiles": quartiles(seconds),
                "all_seconds": seconds,
                "comm_seconds": statistics.median(comm),
            }
            first = per_launch[0][0][0]
            for k in ("value", "matvecs", "loss_after", "cg_iterations"):
                if k in first and not key.startswith("indep"):  # indep: half the data
                    entry[k] = first[k]
            table.setdefault(task, {})[key] = entry
    for task, rows in table.items():
        base = rows["plain x1"]
        for key, row in rows.items():
            row["speedup"] = base["seconds"] / row["seconds"]
            ceiling = rows.get(key.replace("dist", "indep"))
            if key.startswith("dist") and ceiling is not None:
                # the share of the machine's ceiling that hesse.distributed reaches
                row["of_ceiling"] = ceiling["seconds"] / row["seconds"]
            if "value" in row:
                rel = abs(row["value"] - base["value"]) / abs(base["value"])
                assert rel < 1e-4, (task, key, row["value"], base["value"])
            if "loss_after" in row:
                rel = abs(row["loss_after"] - base["loss_after"]) / abs(base["loss_after"])
                assert rel < 1e-3, (task, key, row["loss_after"], base["loss_after"])
    return table


def report(table: dict, samples: int, device: str) -> None:
    print(f"\nMLP 64-256-256-10, {samples} samples, float32, {device}")
    print(
        f"{'task':<18} {'config':<9} {'seconds':>8} {'quartiles':>15} {'speed-up':>9} "
        f"{'in coll.':>9}  answer"
    )
    for task, rows in table.items():
        for key, row in rows.items():
            if "value" in row:
                ans = f"lambda={row['value']:.6g} ({row['matvecs']} products)"
            elif "loss_after" in row:
                ans = f"loss {row['loss_after']:.6f} ({row['cg_iterations']} CG its)"
            else:
                ans = "(each process on its own part: the machine's ceiling)"
            if "of_ceiling" in row:
                ans += f"; {row['of_ceiling']:.0%} of the ceiling"
            lo, hi = row["quartiles"]
            print(
                f"{task:<18} {key:<9} {row['seconds']:8.3f} {lo:7.3f}-{hi:<7.3f} "
                f"{row['speedup']:8.2f}x {row['comm_seconds']:8.3f}s  {ans}"
            )
