"""The top eigenvalue of a CNN's Hessian over a whole dataset within a memory budget: hesse
(default budget, 256 MiB, 0) against PyHessian's full-dataset mode.

The problem: a small CNN with BatchNorm, conv3x3(3->16)-BN-ReLU-conv3x3(16->32, stride 2)-
BN-ReLU-global average pool-linear(10) (P = 5,514 parameters), the mean cross-entropy over
N random images of 3x32x32 with random labels (N = 512, 2048, 8192 by default), batches
from a ``DataLoader(batch_size=128, shuffle=False)``, float32. PyHessian switches the model
to eval mode (``hessian.__init__`` calls ``model.eval()``), so hesse gets the model in eval
mode too and both compute the same Hessian (BatchNorm with running statistics, which are set
beforehand by train-mode passes over the data under ``no_grad``, so that BatchNorm is not
the identity). Before any timing one product of each library over the 512-sample problem is
compared (relative error below 1e-4).

Configurations, each in a fresh process per size and repeat:

* ``hesse default``: ``hesse.eigenvalues(HessianOperator(model, loss, loader), k=1,
  tol=1e-3, seed=0)`` with ``HESSE_MEMORY_BUDGET`` unset (half the available memory: every
  graph cached at these sizes);
* ``hesse 256M``, ``hesse 0``: the same with ``HESSE_MEMORY_BUDGET=256M`` and ``=0``;
* ``PyHessian``: ``hessian(model, loss, dataloader=loader, cuda=False).eigenvalues(top_n=1,
  tol=1e-3)`` (power iteration, stopped when two estimates differ by less than 1e-3
  relative; every product is a forward pass and a double backward per batch), after
  ``torch.manual_seed(0)``.

hesse's tolerance is certified by the residual (``|lambda - theta| <= residual``); PyHessian's
is the change between two power iterates, which does not bound the error. Products are hesse's
``matvecs`` and the calls of PyHessian's ``dataloader_hv_product``.

Each process builds the problem, warms up (one product of its library on one batch of 128:
oneDNN creates its kernels on first use, which costs seconds), collects garbage, hands freed
heap memory back (``malloc_trim``), resets the peak, then runs the eigenvalue once: the
seconds are its wall time (operator construction, linearisation and every product), the
memory the growth of the peak resident set size over the resident size before it
(``_harness.rss_peak_meter``: VmHWM reset through ``/proc/self/clear_refs``; glibc's
default allocator settings, i.e. what a user's process gets); on CUDA the growth of
``torch.cuda.max_memory_allocated``. With ``--repeats`` the figures are medians over repeats
(the configurations in a rotating order).

Targets (issue): with a 256 MiB budget, hesse's extra peak memory <= 1.2 x (PyHessian's +
256 MiB) at every size (so constant in N) and its time <= 1.0x PyHessian's; with the default
budget, where every graph is cached, about 0.6x PyHessian's time.

Run (from the repository root, after ``make bench-deps``)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/memory_budget.py
    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/memory_budget.py --quick
    .venv/bin/python benchmarks/memory_budget.py --device cuda

The figures go to ``benchmarks/results/memory_budget.json`` (``_cuda`` appended on CUDA,
``_quick`` for ``--quick``: sizes 512 and 2048). ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from _harness import (
    RESULTS,
    finish,
    fmt,
    machine,
    malloc_trim,
    print_header,
    print_table,
    rotations,
    rss_peak_meter,
    run_worker,
    write_json,
)
from _peers import PYHESSIAN, patched, pyhessian_hessian

BATCH = 128
TOL = 1e-3  # relative tolerance of the top eigenvalue, both libraries
HVP_TOLERANCE = 1e-4  # hesse's product against PyHessian's
AGREE_PEER = 1e-2  # hesse's eigenvalue against PyHessian's (relative)
AGREE_BUDGETS = 1e-5  # hesse's eigenvalues under different budgets (relative)
MiB = 2**20
BUDGET_256M = 256 * MiB
CONFIGS = {  # key -> (label, HESSE_MEMORY_BUDGET: None unset, "" for PyHessian)
    "hesse_default": ("hesse default", None),
    "hesse_256M": ("hesse 256M", "256M"),
    "hesse_0": ("hesse 0", "0"),
    "pyhessian": ("PyHessian", ""),
}

# -- problem ----------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def make_problem(n: int, device: torch.device) -> tuple[nn.Module, DataLoader]:
    """The model in eval mode, its BatchNorm statistics averaged over the data, and the
    loader (tensors on ``device``)."""
    model = make_model().to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for xb, _ in loader:
            model(xb)
    return model.eval(), loader


def params_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the two libraries ------------------------------------------------------------------


def hesse_eigen(model: nn.Module, loader: Any) -> dict:
    """Top eigenvalue with hesse; what ``linearize()`` kept is read as it is built."""
    seen: list[dict] = []
    init = hesse.LinearizedCurvature.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen.append(
            {
                "memory_budget": self.memory_budget,
                "cached_batches": self.cached_batches,
                "cached_bytes": self.cached_bytes,
                "recomputed": self.recomputed,
            }
        )

    with patched(hesse.LinearizedCurvature, "__init__", spy):
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), loader)
        r = hesse.eigenvalues(H, k=1, tol=TOL, seed=0)
    theta = float(r.eigenvalues[0])
    return {
        "eigenvalue": theta,
        "products": r.matvecs,
        "status": str(r.status),
        "certified_rel_error": float(r.residuals[0]) / abs(theta),
        **(seen[-1] if seen else {}),
    }


def pyhessian_eigen(model: nn.Module, loader: Any) -> dict:
    torch.manual_seed(0)
    hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=loader)
    count = [0]
    fn = hc.dataloader_hv_product

    def counted(v: Any) -> Any:
        count[0] += 1
        return fn(v)

    hc.dataloader_hv_product = counted
    values, _ = hc.eigenvalues(top_n=1, tol=TOL)
    model.zero_grad(set_to_none=True)
    return {"eigenvalue": float(values[0]), "products": count[0]}


def one_batch_warmup(key: str, model: nn.Module, loader: DataLoader) -> None:
    """One product of the configuration's library on one batch (kernels, lazy imports)."""
    batch = [next(iter(loader))]
    if key == "pyhessian":
        hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=batch)
        hc.dataloader_hv_product([torch.randn_like(p) for p in hc.params])
    else:
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), batch)
        H.linearize() @ torch.randn(H.shape[0], device=H.device)
    model.zero_grad(set_to_none=True)


# -- one configuration in a fresh process -------------------------------------------------


def peak_meter(device: torch.device) -> Callable[[], int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - base
    return rss_peak_meter()


def worker(key: str, n: int, device: torch.device) -> dict:
    model, loader = make_problem(n, device)
    one_batch_warmup(key, model, loader)
    run = pyhessian_eigen if key == "pyhessian" else hesse_eigen
    gc.collect()
    malloc_trim()
    growth = peak_meter(device)
    start = time.perf_counter()
    out = run(model, loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_peak_bytes": growth(), **out}


def spawn(key: str, n: int, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", key, "--sizes", str(n)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.pop("HESSE_MEMORY_BUDGET", None)
    budget = CONFIGS[key][1]
    if budget:
        env["HESSE_MEMORY_BUDGET"] = budget
    return run_worker(cmd, env, f"worker {key} at {n}")


# -- checks and summary -----------------------------------------------------------------


def check_product(device: torch.device) -> float:
    """hesse's product against PyHessian's over the 512-sample problem (same Hessian)."""
    model, loader = make_problem(512, device)
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), loader)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3)).to(device)
    hv = H @ v
    hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=loader)
    vs = list(v.split([p.numel() for p in hc.params]))
    _, ref = hc.dataloader_hv_product([t.view_as(p) for t, p in zip(vs, hc.params)])
    model.zero_grad(set_to_none=True)
    ref_flat: Tensor = torch.cat([t.reshape(-1) for t in ref])
    err = float((hv - ref_flat).norm() / ref_flat.norm())
    if not err < HVP_TOLERANCE:
        raise RuntimeError(f"hesse's product differs from PyHessian's: rel. error {err:.1e}")
    return err


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


# -- driver -----------------------------------------------------------------------------


def metadata(args: argparse.Namespace, device: torch.device) -> dict:
    return {
        **machine(device, (PYHESSIAN,)),
        "dtype": "float32",
        "sizes": args.sizes,
        "repeats": args.repeats,
        "configs": args.configs,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="numbers of samples"
    )
    p.add_argument("--repeats", type=int, default=1, help="processes per configuration and size")
    p.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="a subset"
    )
    p.add_argument("--quick", action="store_true", help="sizes 512 and 2048")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [512, 2048]
    if any(n % BATCH for n in args.sizes):
        p.error(f"sizes must be multiples of the batch size {BATCH}")
    if args.out is None:
        suffix = ("_cuda" if args.device.startswith("cuda") else "") + (
            "_quick" if args.quick else ""
        )
        args.out = RESULTS / f"memory_budget{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], device)))
        return 0
    meta = metadata(args, device)
    print_header(meta)
    start = time.perf_counter()
    model, _ = make_problem(512, device)
    P = params_count(model)
    err = check_product(device)
    print(f"CNN, P = {P}, batch {BATCH}, eval mode; hesse vs PyHessian product: {err:.1e}")
    keys = [k for k in CONFIGS if k in args.configs]
    runs: dict[int, dict[str, list[dict]]] = {n: {k: [] for k in keys} for n in args.sizes}
    for n in args.sizes:
        for _, order in rotations(keys, args.repeats):
            for key in order:
                out = spawn(key, n, args)
                if out is not None:
                    runs[n][key].append(out)
                    print(
                        f"  N={n} {key}: {out['seconds']:.2f} s, "
                        f"{out['extra_peak_bytes'] / MiB:.1f} MiB, {out['products']} products, "
                        f"{out['eigenvalue']:.7g}",
                        flush=True,
                    )
    results = {n: {k: median_run(rs) for k, rs in runs[n].items() if rs} for n in args.sizes}
    report(results, device)
    v = verdicts(results)
    print_verdicts(v)
    finish(meta, start)
    out = {
        "meta": meta,
        "problem": {
            "model": "conv3x3(3->16)-BN-ReLU-conv3x3(16->32, s2)-BN-ReLU-avgpool-linear(10), "
            "eval mode (as PyHessian forces), BN running stats averaged over the data",
            "loss": "cross-entropy (mean)",
            "inputs": "3x32x32 N(0, 1), labels uniform in 0..9",
            "batch_size": BATCH,
            "params": P,
            "tol": TOL,
            "hvp_rel_error_vs_pyhessian": err,
        },
        "configurations": {
            k: {"label": lab, "HESSE_MEMORY_BUDGET": b} for k, (lab, b) in CONFIGS.items()
        },
        "results": {str(n): rows for n, rows in results.items()},
        "verdict": v,
        "notes": [
            "one fresh process per configuration, size and repeat; each warms up with one "
            "product of its library on one batch, then runs the eigenvalue once",
            "seconds: wall time of the whole call (operator, linearisation, every product)",
            "memory: growth of the peak RSS (VmHWM reset) over the RSS after gc and malloc_trim, "
            "glibc defaults; on CUDA the growth of max_memory_allocated",
            "timings come from a 2-core machine shared with other work: noisy (10-30%)",
        ],
    }
    write_json(args.out, out)
    print(f"({meta['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
