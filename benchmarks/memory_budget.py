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
(``_memory.rss_peak_meter``: VmHWM reset through ``/proc/self/clear_refs``; glibc's
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
import json
import os
import sys
import time
from pathlib import Path

import torch

from _harness import RESULTS, finish, machine, print_header, rotations, write_json
from _memory import run_worker
from _memory_budget_report import MiB, median_run, print_verdicts, report, verdicts
from _memory_budget_runs import (
    BATCH,
    CONFIGS,
    TOL,
    check_product,
    make_problem,
    params_count,
    worker,
)
from _peers import PYHESSIAN

# -- one configuration in a fresh process ----------------------------------------------


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
