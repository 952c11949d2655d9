"""The dense curvature of a subsampled Newton step: in one pass, or from P products?

``hesse.optim.SubsampledNewton`` (``solver="auto"``, P <= ``dense_max``) forms its
curvature on the subsample as a dense ``P x P`` matrix and solves it by Cholesky. It can
form it two ways: in one batched pass over the subsample (``dense_model_curvature``:
per-sample Jacobians, and for the Hessian of a model that is not linear in its parameters
a second term by forward-over-reverse, ``P`` tangents under ``vmap``), or from the
operator's products, 128 columns at a time through the linearised graph. Across ranks
(``hesse.distributed``), the one-pass matrices of the shards are averaged in one
collective; the products are reduced one block of columns at a time.

This times one step (after a warm-up step) of each way, on an MLP 20-40-3 (tanh, float64,
P = 963, cross-entropy) with 8192 samples and ``subsample=0.25`` (raised to 4 samples per
unknown, 3852), for the GGN and the Hessian, on one process and on ``--ranks`` ranks of
one thread each (the data split evenly; torchrun). The step the optimizer takes (its
choice: ``second_term=False``) is ``auto``; ``one-pass`` and ``products`` force each way.
The loss after the steps must agree between the ways (same iterates to rounding).

Run (from the repository root, an otherwise idle machine)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_curvature.py      # ~3 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_curvature.py --quick

Results: a table, and ``benchmarks/results/dense_curvature.json`` (``_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _harness import finish, machine, print_header, print_table, result_path, write_json

N, D, H, C = 8192, 20, 40, 3
WAYS = ("auto", "one-pass", "products")


def _force(way: str):
    """Make the optimizer form its dense curvature one way (``auto``: its own choice)."""
    from hesse.operators import _dense
    from hesse.optim import _newton

    orig = _dense.dense_model_curvature
    if way == "products":
        _newton.dense_model_curvature = lambda *a, **k: None
    elif way == "one-pass":
        _newton.dense_model_curvature = lambda *a, **k: orig(*a, **{**k, "second_term": True})
    else:
        _newton.dense_model_curvature = orig


def run(curvature: str, way: str, steps: int, rank: int = 0, world: int = 1) -> dict:
    import hesse

    _force(way)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, dtype=torch.float64, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    lo, hi = rank * N // world, (rank + 1) * N // world
    xs, ys = X[lo:hi], y[lo:hi]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    loss_fn = nn.CrossEntropyLoss()
    kw = {"model": model, "loss_fn": loss_fn, "subsample": 0.25, "curvature": curvature}
    if world > 1:
        import hesse.distributed as hd

        opt = hd.SubsampledNewton(model.parameters(), samples=hi - lo, **kw)
    else:
        opt = hesse.optim.SubsampledNewton(model.parameters(), **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(xs), ys)
        loss.backward()
        return loss

    opt.step(closure, batch=(xs, ys))  # warm-up: the first step of a process is slow
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure, batch=(xs, ys))
    if world > 1:
        torch.distributed.barrier()
    seconds = (time.perf_counter() - t0) / steps
    with torch.no_grad():
        loss = float(loss_fn(model(xs), ys)) if world == 1 else None
    return {"seconds": seconds, "loss": loss}


def worker(args) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {}
    for curvature in ("ggn", "hessian"):
        for way in WAYS:
            out[f"{curvature}/{way}"] = run(curvature, way, args.steps, rank, world)
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def distributed(ranks: int, steps: int) -> dict:
    out = Path(result_path("dense_curvature_worker")).with_suffix(".tmp.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", __file__, "--worker", "--steps", str(steps),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed step, 2 ranks")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    steps = 1 if args.quick else args.steps
    meta = machine()
    print_header(meta)
    results = {"1": {}, str(args.ranks): distributed(args.ranks, steps)}
    for curvature in ("ggn", "hessian"):
        for way in WAYS:
            results["1"][f"{curvature}/{way}"] = run(curvature, way, steps)
    rows = []
    for world, res in results.items():
        for curvature in ("ggn", "hessian"):
            base = res[f"{curvature}/products"]["seconds"]
            for way in WAYS:
                r = res[f"{curvature}/{way}"]
                rows.append([world, curvature, way, r["seconds"], r["seconds"] / base, r["loss"]])
    print_table(
        f"one SubsampledNewton step (P = 963, 3852 samples), seconds; mean of {steps} steps",
        [("ranks", "<6"), ("curvature", "<10"), ("way", "<9"), ("s/step", "8.3f"),
         ("x products", "10.2f"), ("loss after", "14.10f")],
        rows,
    )  # fmt: skip
    losses = {
        curv: {results["1"][f"{curv}/{w}"]["loss"] for w in WAYS} for curv in ("ggn", "hessian")
    }
    spread = max(max(v) - min(v) for v in losses.values())
    print(f"largest spread of the loss between the ways (1 process): {spread:.1e}")
    name = "dense_curvature_quick" if args.quick else "dense_curvature"
    write_json(result_path(name), {"meta": finish(meta), "results": results})


if __name__ == "__main__":
    main()
