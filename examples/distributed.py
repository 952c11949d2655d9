"""Curvature and second-order training with the data split over processes.

Each rank holds every world-th sample of the digits training set. The Hessian's top
eigenvalue and the Gauss-Newton trace are computed over all of it, then HessianFree trains
the MLP for a few steps; every rank gets the same numbers, the ones a single process on
all the data gets.

Run::

    torchrun --standalone --nproc-per-node 2 examples/distributed.py
    python examples/distributed.py          # one process: the same numbers

(``torchrun`` sets ``OMP_NUM_THREADS=1`` per rank; on a machine with GPUs each rank takes
the GPU of its ``LOCAL_RANK`` and the backend is nccl.)
"""

from __future__ import annotations

import gc
import os
import socket
import time

import torch
import torch.distributed as dist

import hesse
import hesse.problems


def start() -> torch.device:
    if "RANK" not in os.environ:  # plain `python`: a world of one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def main() -> None:
    device = start()
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    pb = hesse.problems.problem("mlp-digits", dtype=torch.float64, device=device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = pb.make_model()
    X, y = pb.train
    Xs, ys = X[rank::world], y[rank::world]  # this rank's shard
    shard = [(Xs[i : i + 256], ys[i : i + 256]) for i in range(0, len(Xs), 256)]
    say(f"{world} rank(s); {len(X)} training samples, {len(Xs)} on rank 0")

    t0 = time.perf_counter()
    H = hesse.distributed.HessianOperator(model, pb.loss_fn, shard)
    top = hesse.eigenvalues(H, k=1, seed=0, tol=1e-8)
    G = hesse.distributed.GGNOperator(model, pb.loss_fn, shard)
    tr = hesse.trace(G, num_matvecs=60, seed=0)
    say(f"top Hessian eigenvalue at init: {float(top.eigenvalues[0]):.10f}")
    say(f"GGN trace at init: {tr.estimate:.6f} ± {tr.stderr:.2g}")

    opt = hesse.distributed.HessianFree(
        model.parameters(), model=model, loss_fn=pb.loss_fn, samples=len(Xs)
    )

    def closure():
        opt.zero_grad()
        loss = pb.loss_fn(model(Xs), ys)  # the mean over this rank's shard
        loss.backward()
        return loss

    for step in range(10):
        loss = opt.step(closure, batch=(Xs, ys))
        say(f"step {step}: loss {float(loss):.10f}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = flat.clone()
    dist.broadcast(same, src=0)
    agree = torch.tensor([float(torch.equal(flat, same))], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    with torch.no_grad():
        accuracy = pb.metric(model(pb.test[0]), pb.test[1])
    say(f"parameters identical on all {world} rank(s): {bool(agree.item())}")
    say(f"test accuracy: {accuracy:.4f}; {time.perf_counter() - t0:.2f} s")
    # Free hesse's objects (the optimizer keeps autograd graphs) before the process group
    # goes: freed at exit after destroy_process_group, they made gloo abort the process now
    # and then on a loaded machine ("terminate called without an active exception").
    H = G = opt = closure = None
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
