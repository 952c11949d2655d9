"""Data-parallel speed-up of hesse.distributed: N ranks against 1, on the same total data.

The problem is the foundation's MLP 64-256-256-10 (tanh, float32, P = 85,002) with
cross-entropy on ``--samples`` random samples (8192 and 16384 by default, in batches of
1024, the foundation's batch), split evenly over the ranks. Two tasks:

* **top eigenvalue**: ``hesse.eigenvalues(H, k=1, tol=1e-3, seed=0)`` of the Hessian over
  all the data, linearisation (forward passes and graphs) included;
* **one HessianFree step** (GGN curvature on the whole data, damping 1e-2 and CG to a
  relative residual of 1e-6, so that CG does its ``cg_max_iter`` = 30 iterations as in
  mid-training; Hutchinson preconditioner, CG backtracking, Armijo line search), from the
  same start each time.

Configurations, each its own set of processes of one thread (``OMP_NUM_THREADS=1``):

* ``1 process``: plain ``hesse.HessianOperator`` / ``hesse.optim.HessianFree`` on all
  the data, no process group: the baseline;
* ``dist x1``: ``hesse.distributed`` on a world of one rank (what the data-parallel code
  costs by itself);
* ``dist x2`` (and ``x4`` with ``--ranks 1 2 4`` on a bigger machine): the data split
  over the ranks;
* ``indep x2``: two plain processes at the same time, each on its half alone, with no
  communication at all: what this machine allows (both cores busy share caches, memory
  bandwidth and clock boost), against which ``dist x2``'s own overhead is measured.

Each process does ``--warmup`` (1) untimed run of both tasks (the first products of a
process, and gloo's first collectives, are slow), then ``--repeats`` (3) timed ones; the
configurations are launched ``--rounds`` (2) times, interleaved, and the table gives
medians and quartiles over all timed repeats (every run is in the JSON). A task's time
is the slowest rank's (after a barrier). "In collectives" is the time ranks spent inside
hesse's all-reduces and broadcasts, waiting for the slower rank included (the median over
ranks of each rank's total). The answers of every configuration are checked to agree
(eigenvalue to 1e-4 relative, loss after the step to 1e-3: the float32 sums are
reordered, so not bit for bit).

Run (from the repository root)::

    .venv/bin/python benchmarks/distributed.py            # about 9 minutes on 2 cores
    .venv/bin/python benchmarks/distributed.py --quick    # 1 round, 4096 samples

On a GPU machine, ``--device cuda --backend nccl`` runs one rank per GPU (``x1`` only
on a machine with one GPU). Results go to ``benchmarks/results/distributed_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import hesse
from _distributed_report import report, summarize
from _harness import finish, machine, print_header, result_path, rotations, write_json
from _models import make_model


def problem(samples: int, device: torch.device):
    torch.manual_seed(0)
    model, shape, batch = make_model("mlp")
    model = model.to(device)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(samples, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (samples,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), X, y, batch


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single plain process): time both tasks, write a JSON line."""
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    plain = args.config in ("plain", "indep")  # indep: plain hesse on this rank's part
    dist = None
    if not plain:
        import torch.distributed as dist

        dist.init_process_group(
            args.backend,
            init_method=f"file://{os.environ['STORE']}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
    model, loss_fn, X, y, batch = problem(args.samples, device)
    lo, hi = rank * args.samples // world, (rank + 1) * args.samples // world
    Xs, ys = X[lo:hi], y[lo:hi]
    shard = [(Xs[i : i + batch], ys[i : i + batch]) for i in range(0, len(Xs), batch)]
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    comm = None if plain else hesse.distributed.Communicator()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if dist is not None:
            dist.barrier()

    def slowest(t: float) -> float:
        if dist is None:
            return t
        buf = torch.tensor([t], dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return float(buf)

    def eig() -> dict:
        model.load_state_dict(start_state)
        if plain:
            H = hesse.HessianOperator(model, loss_fn, shard)
        else:
            H = hesse.distributed.HessianOperator(model, loss_fn, shard, group=comm)
        r = hesse.eigenvalues(H, k=1, tol=1e-3, seed=0)
        return lambda: {"value": float(r.eigenvalues[0]), "matvecs": r.matvecs}

    def hf() -> dict:
        model.load_state_dict(start_state)
        kw = {"model": model, "loss_fn": loss_fn, "cg_max_iter": args.cg_max_iter}
        kw.update(damping=1e-2, cg_rtol=1e-6)  # CG does its cg_max_iter iterations
        if plain:
            opt = hesse.optim.HessianFree(model.parameters(), **kw)
        else:
            opt = hesse.distributed.HessianFree(
                model.parameters(), samples=len(Xs), group=comm, **kw
            )

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(Xs), ys)
            loss.backward()
            return loss

        opt.step(closure, batch=(Xs, ys))

        def answer() -> dict:  # after the clock stops
            if plain:
                with torch.no_grad():
                    loss = float(loss_fn(model(X), y))
            else:
                loss = float(hesse.distributed.loss_and_gradient(model, loss_fn, shard)[0])
            return {"loss_after": loss, "cg_iterations": opt.global_state()["cg_iterations"]}

        return answer

    rows = []
    for rep in range(args.warmup + args.repeats):
        for name, task in (("eigenvalue", eig), ("hessian_free_step", hf)):
            sync()
            c0 = comm.seconds if comm else 0.0
            t0 = time.perf_counter()
            out = task()
            sync()
            t = time.perf_counter() - t0
            comm_t = (comm.seconds - c0) if comm else 0.0
            t = slowest(t)
            if rep >= args.warmup:
                rows.append({"task": name, "seconds": t, "comm_seconds": comm_t, **out()})
    print("RESULT " + json.dumps({"rank": rank, "world": world, "rows": rows}), flush=True)
    if dist is not None:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, config: str, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "WORLD_SIZE": str(world),
            "STORE": os.path.join(tmp, "store"),
        }
        cmd = [sys.executable, __file__, "--worker", "--config", config]
        cmd += ["--samples", str(args.samples), "--repeats", str(args.repeats)]
        cmd += ["--cg-max-iter", str(args.cg_max_iter), "--device", args.device]
        cmd += ["--backend", args.backend, "--warmup", str(args.warmup)]
        procs = [
            subprocess.Popen(
                cmd,
                env={**env, "RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        outs = [p.communicate(timeout=1800)[0] for p in procs]
    results = []
    for r, (p, out) in enumerate(zip(procs, outs)):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"{config} x{world}, rank {r} failed:\n{out}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="dist", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cg-max-iter", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = ap.parse_args()
    if args.worker:
        args.samples = args.samples[0]
        worker(args)
        return
    if args.quick:
        args.samples, args.rounds, args.repeats = [4096], 1, 2
    meta = {
        **machine(args.device),
        "backend": args.backend,
        "threads_per_rank": 1,
        "cg_max_iter": args.cg_max_iter,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    print_header(meta)
    start = time.perf_counter()
    configs = [("plain", 1)] + [("dist", w) for w in args.ranks]
    configs += [("indep", w) for w in args.ranks if w > 1]
    results = {}
    for samples in args.samples:
        run_args = argparse.Namespace(**{**vars(args), "samples": samples})
        runs: dict[str, list[list[dict]]] = {f"{c} x{w}": [] for c, w in configs}
        for rnd, order in rotations(configs, args.rounds):
            for config, world in order:
                runs[f"{config} x{world}"].append(launch(run_args, config, world))
                print(f"{samples} samples, round {rnd + 1}/{args.rounds}: {config} x{world}")
        results[str(samples)] = summarize(runs)
        report(results[str(samples)], samples, args.device)
    finish(meta, start)
    name = f"distributed_{args.device}{'_quick' if args.quick else ''}"
    write_json(result_path(name, args.out), {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
