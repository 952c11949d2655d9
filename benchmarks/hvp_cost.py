"""Cost of a Hessian-vector product, as a multiple of the cost of one gradient.

For two small networks (an MLP 64-256-256-10 with tanh on a batch of 1024, and a two-layer
ReLU CNN on a batch of 256 MNIST-shaped images; float32, cross-entropy), this times one
product of each method below and divides it by the time of one gradient (forward and
backward of the mean loss with ``torch.autograd.grad``) measured in the same round:

* hesse: ``HessianOperator @ v`` at a new point (reverse-over-reverse and
  forward-over-reverse), ``H.linearize() @ v`` (many products at one point), the same for
  ``GGNOperator``, and the cost of ``linearize()`` itself;
* plain double backward at a new point, and reusing one cached gradient graph;
* the peers, where installed (``make bench-deps``): PyHessian (cached graph; its
  construction is a separate row), curvlinops, hessian-eigenthings and BackPACK (Hessian
  and GGN products, forward pass included).

Operators (hesse, curvlinops, eigenthings) are constructed once, outside the timed loop:
their construction is lazy (no forward pass). Work done once per point (``linearize()``,
PyHessian's constructor) is timed as its own "setup" row.

Every product is first checked against a float64 double-backward reference (relative error
below 1e-4), so that no wrong product is timed. Timing is interleaved
(``_harness.time_calls``): after warm-up, each round runs every method once, in a new random
order, and the table reports the median time and the median over rounds of the ratio to that
round's gradient. Peak memory is the extra memory of the call, as a ratio to the gradient's:
on CUDA from the allocator's peak, on CPU from the growth of the peak RSS of a fresh
subprocess per method (coarse).

Run (from the repository root, after ``make bench-deps``)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hvp_cost.py            # full, a few minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hvp_cost.py --quick    # a short check
    .venv/bin/python benchmarks/hvp_cost.py --device cuda   # the default where CUDA is there

On CUDA, TF32 is switched off so that float32 means float32.

The figures go to ``benchmarks/results/hvp_cost_<device>.json`` (``_quick`` appended for
``--quick``). ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from _harness import (
    RESULTS,
    Call,
    finish,
    machine,
    print_header,
    print_table,
    quartiles,
    time_calls,
    write_json,
)
from _hvp_cost_methods import BY_KEY, TOLERANCE, prepare
from _memory import cpu_memory_note, cuda_extra_peak, fresh_process_peak, print_worker_peak
from _models import make_problem, references
from _peers import CURVATURE_PEERS

CPU_MEMORY_NOTE = cpu_memory_note("method")


# -- memory -------------------------------------------------------------------------------


def memory_worker(key: str, model: str, device: torch.device) -> int:
    """In a fresh process: set one method up and call it once (one-time buffers, lazy
    imports), then print the growth of the peak RSS over 3 more calls as JSON."""
    pb = make_problem(model, device)
    call = BY_KEY[key].factory(pb)
    call()  # the result is dropped at once
    pb.model.zero_grad(set_to_none=True)  # the graph PyHessian's construction left in .grad
    return print_worker_peak(call)


def measure_memory(
    calls: dict[str, Call], model: str, device: torch.device, threads: int
) -> dict[str, int | None]:
    if device.type == "cuda":
        return {k: cuda_extra_peak(call) for k, call in calls.items()}
    return {k: fresh_process_peak(__file__, k, ["--models", model], threads) for k in calls}


# -- summary and report ---------------------------------------------------------------------


def summarise(
    rows: dict[str, dict], times: dict[str, list[float]], memory: dict[str, int | None]
) -> None:
    """Add medians and ratios to the gradient (per round for time) to the rows, in place."""
    grad_t, grad_m = times["gradient"], memory.get("gradient")
    for key, ts in times.items():
        ratios = [t / g for t, g in zip(ts, grad_t)]
        mem = memory.get(key)
        rows[key].update(
            median_ms=1e3 * statistics.median(ts),
            ratio=statistics.median(ratios),
            ratio_quartiles=quartiles(ratios),
            times_ms=[round(1e3 * t, 4) for t in ts],
            memory_bytes=mem,
            memory_ratio=mem / grad_m if mem is not None and grad_m else None,
        )


def report(title: str, rows: dict[str, dict]) -> None:
    columns = [
        ("method", "<36"),
        ("ms", "8.2f"),
        ("x grad", "6.2f"),
        ("[quartiles]", ">12"),
        ("MiB", "7.1f"),
        ("mem x grad", "10.2f"),
        ("rel.err", "8.1e"),
    ]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    print_table(
        title,
        columns,
        [
            [
                r["label"],
                r["median_ms"],
                r["ratio"],
                "[{:.2f}-{:.2f}]".format(*r["ratio_quartiles"]),
                None if r["memory_bytes"] is None else r["memory_bytes"] / 2**20,
                r["memory_ratio"],
                r["rel_error"],
            ]
            for r in ok
        ],
    )
    for row in rows.values():
        if row["status"] != "ok":
            print(f"{row['label']:<36} {row['status'].upper()}: {row['note']}")
    for row in ok:
        if row["note"]:
            print(f"  note, {row['label']}: {row['note']}")


def metadata(device: torch.device, args: argparse.Namespace) -> dict:
    return {
        **machine(device, CURVATURE_PEERS),
        "dtype": "float32 (TF32 off)",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "tolerance": TOLERANCE,
        "memory": "CUDA allocator peak" if device.type == "cuda" else CPU_MEMORY_NOTE,
    }


# -- driver ---------------------------------------------------------------------------------


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    pb = make_problem(name, device)
    calls, rows = prepare(pb, references(pb))
    if "gradient" not in calls:
        raise RuntimeError(f"{name}: the gradient itself failed: {rows['gradient']['note']}")
    times = time_calls(calls, args.rounds, args.warmup, device)
    memory = {} if args.no_memory else measure_memory(calls, name, device, args.threads)
    summarise(rows, times, memory)
    title = (
        f"{name}: P = {pb.v.numel()}, batch {pb.X.shape[0]}, {device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    report(title, rows)
    return {"params": pb.v.numel(), "batch": pb.X.shape[0], "rows": list(rows.values())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method (default 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    p.add_argument("--memory-worker", choices=sorted(BY_KEY), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    if args.out is None:
        suffix = "_quick" if args.quick else ""
        args.out = RESULTS / f"hvp_cost_{torch.device(args.device).type}{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # True float32 on GPUs: TF32 convolutions (cuDNN's default) alone give relative errors
    # above 1e-4 on the CNN, for every method, plain double backward included.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.models[0], device)
    meta = metadata(device, args)
    print_header(meta)
    models = {name: run_model(name, device, args) for name in args.models}
    notes = [
        "ratios are medians over rounds of (method time / gradient time of that round)",
        "setup rows are one-off costs, not products",
    ]
    if device.type == "cpu" and not args.no_memory:
        notes.append(CPU_MEMORY_NOTE)
        print(f"\n{CPU_MEMORY_NOTE}")
    finish(meta)
    write_json(args.out, {"meta": meta, "notes": notes, "models": models})
    bad = [
        r["key"] for m in models.values() for r in m["rows"] if r["status"] in ("wrong", "failed")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
