"""One rank of the data-parallel tests (started by tests/test_distributed.py, one process
per rank, gloo on loopback; the launcher sets RANK, WORLD_SIZE and STORE).

    python distributed_worker.py SCENARIO OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.pt``: its results, and on rank 0 the single-process
references over the concatenated data; or the error it ended with.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import hesse
from hesse import distributed as hd

N, D, C = 31, 5, 3  # samples, features, classes


def problem():
    """The same model and data on every rank (the model's init is seeded)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))
    return model, nn.CrossEntropyLoss(), x, y


def shard_bounds(rank: int, world: int) -> tuple[int, int]:
    """An uneven split: rank r holds about (r + 1) / sum parts."""
    weights = [r + 1 for r in range(world)]
    cuts = [0]
    for w in weights:
        cuts.append(cuts[-1] + round(N * w / sum(weights)))
    cuts[-1] = N
    return cuts[rank], cuts[rank + 1]


def batches(x, y, size=4):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def operators(rank, world, out):
    model, loss_fn, x, y = problem()
    lo, hi = shard_bounds(rank, world)
    shard = batches(x[lo:hi], y[lo:hi])
    full = batches(x, y, size=7)
    P = sum(p.numel() for p in model.parameters())
    V = out["V"] = torch.randn(P, 3, generator=torch.Generator().manual_seed(2))
    kinds = {
        "hessian": (hd.HessianOperator, hesse.HessianOperator, {}),
        "ggn": (hd.GGNOperator, hesse.GGNOperator, {}),
        "fisher": (hd.FisherOperator, hesse.FisherOperator, {}),
        "fd": (hd.FiniteDifferenceHessian, hesse.FiniteDifferenceHessian, {}),
    }
    for name, (dist_cls, local_cls, kw) in kinds.items():
        op = dist_cls(model, loss_fn, shard, **kw)
        out[f"{name}_v"] = op @ V
        out[f"{name}_vec"] = op @ V[:, 0]
        if rank == 0:
            ref = local_cls(model, loss_fn, full, **kw)
            out[f"ref_{name}_v"] = ref @ V
    ddp = nn.parallel.DistributedDataParallel(model)  # accepted: its module is used
    out["ddp_ggn_v"] = hd.GGNOperator(ddp, loss_fn, shard) @ V
    H = hd.HessianOperator(model, loss_fn, shard)
    G = hd.GGNOperator(model, loss_fn, shard)
    # Each rank asks for a different seed: the probes must still be rank 0's.
    out["eig"] = hesse.eigenvalues(H, k=2, which="both", seed=rank, tol=1e-8).eigenvalues
    out["trace"] = hesse.trace(G, "hutchinson", 20, seed=rank).estimate
    out["xtrace"] = hesse.trace(H, "xtrace", 20, seed=rank).estimate
    out["hutchpp"] = hesse.trace(H, "hutch++", 21, seed=rank).estimate
    out["density"] = hesse.spectral_density(H, num_probes=3, steps=20, grid=50, seed=rank).density
    out["cg"] = hesse.linalg.cg(G.damped(0.1), V[:, 1], rtol=1e-12).x
    out["diag"] = hesse.diagonal(G, "xdiag", 30, seed=rank).estimate
    out["nystrom"] = hesse.low_rank(G, 4, "nystrom", seed=rank).s
    out["layers"] = hd.layer_report(model, loss_fn, shard, exact_limit=30).as_dicts()
    loss, g = hd.loss_and_gradient(model, loss_fn, shard)
    out["loss"], out["grad"] = loss, g
    mc = hd.FisherOperator(model, loss_fn, shard, kind="mc", mc_samples=2)
    out["mc_v"] = mc @ V
    if rank == 0:
        Hf = hesse.HessianOperator(model, loss_fn, full)
        Gf = hesse.GGNOperator(model, loss_fn, full)
        out["ref_eig"] = hesse.eigenvalues(Hf, k=2, which="both", seed=0, tol=1e-8).eigenvalues
        out["ref_trace"] = hesse.trace(Gf, "hutchinson", 20, seed=0).estimate
        out["ref_xtrace"] = hesse.trace(Hf, "xtrace", 20, seed=0).estimate
        out["ref_hutchpp"] = hesse.trace(Hf, "hutch++", 21, seed=0).estimate
        out["ref_density"] = hesse.spectral_density(
            Hf, num_probes=3, steps=20, grid=50, seed=0
        ).density
        out["ref_cg"] = hesse.linalg.cg(Gf.damped(0.1), V[:, 1], rtol=1e-12).x
        out["ref_diag"] = hesse.diagonal(Gf, "xdiag", 30, seed=0).estimate
        out["ref_nystrom"] = hesse.low_rank(Gf, 4, "nystrom", seed=0).s
        out["ref_layers"] = hesse.layer_report(model, loss_fn, full, exact_limit=30).as_dicts()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        full_loss = lambda w: torch.func.functional_call(  # noqa: E731
            model, dict(zip([n for n, _ in model.named_parameters()], _split(w, model))), (x,)
        )
        out["ref_loss"] = loss_fn(full_loss(flat), y)
        out["ref_grad"] = torch.func.grad(lambda w: loss_fn(full_loss(w), y))(flat)
        out["ref_dense_h"] = torch.func.hessian(lambda w: loss_fn(full_loss(w), y))(flat)


def _split(w, model):
    sizes = [p.numel() for p in model.parameters()]
    return [t.view_as(p) for t, p in zip(torch.split(w, sizes), model.parameters())]


OPTIMIZERS = {
    "lbfgs": lambda cls, m: cls(m.parameters(), max_iter=4),
    "newton-cg": lambda cls, m: cls(m.parameters()),
    "hf-hessian": lambda cls, m: cls(m.parameters()),
    "hf-ggn": lambda cls, m: cls(m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss()),
    "subsampled": lambda cls, m: cls(
        m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), subsample=1.0
    ),
    # the GGN is formed in one pass on each shard and the matrices averaged (the
    # Hessian of this MLP comes from the reduced operator's products)
    "subsampled-ggn": lambda cls, m: cls(
        m.parameters(), model=m, loss_fn=nn.CrossEntropyLoss(), subsample=1.0, curvature="ggn"
    ),
    "adahessian": lambda cls, m: cls(m.parameters(), lr=0.1),
    "sophia": lambda cls, m: cls(m.parameters(), lr=0.05, update_each=2),
    "sophia-gnb": lambda cls, m: cls(m.parameters(), lr=0.05, update_each=2, estimator="gnb"),
}
CLASSES = {
    "lbfgs": "LBFGS",
    "newton-cg": "NewtonCG",
    "hf-hessian": "HessianFree",
    "hf-ggn": "HessianFree",
    "subsampled": "SubsampledNewton",
    "subsampled-ggn": "SubsampledNewton",
    "adahessian": "AdaHessian",
    "sophia": "Sophia",
    "sophia-gnb": "Sophia",
}


def _train(opt, model, loss_fn, x, y, steps, batch):
    losses = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        if batch == "outputs":
            loss = opt.step(closure, outputs_fn=lambda: model(x))
        else:
            loss = opt.step(closure, batch=(x, y)) if batch else opt.step(closure)
        losses.append(float(loss))
    return torch.tensor(losses), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def optimizers(rank, world, out):
    lo, hi = shard_bounds(rank, world)
    for name, make in OPTIMIZERS.items():
        batch = (
            "outputs"
            if name == "sophia-gnb"
            else name in ("hf-ggn", "subsampled", "subsampled-ggn")
        )
        model, loss_fn, x, y = problem()
        if rank == 1:  # a different start: the optimizer must give rank 1 rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        cls = getattr(hd, CLASSES[name])
        opt = make(lambda *a, _c=cls, **k: _c(*a, samples=hi - lo, **k), model)
        out[f"{name}_losses"], out[f"{name}_x"] = _train(
            opt, model, loss_fn, x[lo:hi], y[lo:hi], 6, batch
        )
        if rank == 0:
            model, loss_fn, x, y = problem()
            opt = make(getattr(hesse.optim, CLASSES[name]), model)
            out[f"ref_{name}_losses"], out[f"ref_{name}_x"] = _train(
                opt, model, loss_fn, x, y, 6, batch
            )


def kfac(rank, world, out):
    """KFAC over shards against one process on all the data: the operators' factors
    (type-2 and empirical, EKFAC's refitted eigenvalues) and hesse.optim.KFAC's
    trajectories (factors from the closure, and type-2 on the batch); on the last rank a
    second run holds no data (samples=0)."""
    lo, hi = shard_bounds(rank, world)
    model, loss_fn, x, y = problem()
    shard, full = batches(x[lo:hi], y[lo:hi]), batches(x, y, size=7)
    for fisher in ("type-2", "empirical"):
        K = hd.KFACOperator(model, loss_fn, shard, fisher=fisher)
        out[f"op_{fisher}"] = [(b.A, b.G) for b in K.blocks]
        if rank == 0:
            ref = hesse.KFACOperator(model, loss_fn, full, fisher=fisher)
            out[f"ref_op_{fisher}"] = [(b.A, b.G) for b in ref.blocks]
    out["layers"] = hd.layer_report(model, loss_fn, shard, exact_limit=40, kfac=True).as_dicts()
    if rank == 0:
        ref = hesse.layer_report(model, loss_fn, full, exact_limit=40, kfac=True)
        out["ref_layers"] = ref.as_dicts()
    E = hd.EKFACOperator(model, loss_fn, shard)
    out["ekfac"] = [b.eigenvalues for b in E.blocks]
    if rank == 0:
        out["ref_ekfac"] = [b.eigenvalues for b in hesse.EKFACOperator(model, loss_fn, full).blocks]
    settings = {
        "closure": dict(
            lr=0.3,
            damping=0.1,
            momentum=0.5,
            weight_decay=0.01,
            update_each=2,
            inverse_each=3,
            factor_decay=0.8,
        ),
        "type-2": dict(
            lr=0.3, damping=0.1, momentum=0.5, loss_fn=loss_fn, fisher="type-2", inverse_each=2
        ),
    }
    for name, kw in settings.items():
        for empty in (False, True):
            if empty and rank == world - 1:
                a, b = lo, lo  # this rank holds nothing; the one before it takes its part
            elif empty and rank == world - 2:
                a, b = lo, shard_bounds(world - 1, world)[1]
            else:
                a, b = lo, hi
            model, loss_fn, x, y = problem()
            if rank == 1:  # rank 0's weights are given to every rank at the first step
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            opt = hd.KFAC(model, samples=b - a, **kw)
            batch = name == "type-2" and b > a
            key = f"{name}{'_empty' if empty else ''}"
            out[f"{key}_losses"], out[f"{key}_x"] = _train(
                opt, model, loss_fn, x[a:b], y[a:b], 5, batch
            )
            out[f"{key}_A"] = opt.state[model[0].weight]["A"].clone()
        if rank == 0:
            model, loss_fn, x, y = problem()
            opt = hesse.optim.KFAC(model, **kw)
            out[f"ref_{name}_losses"], out[f"ref_{name}_x"] = _train(
                opt, model, loss_fn, x, y, 5, name == "type-2"
            )
            out[f"ref_{name}_A"] = opt.state[model[0].weight]["A"].clone()
    # errors: the same decision on every rank, nobody left waiting
    model, loss_fn, x, y = problem()
    try:  # a DDP-wrapped model: refused (it would reduce the gradients twice)
        hd.KFAC(nn.parallel.DistributedDataParallel(model), samples=hi - lo)
    except ValueError as err:
        out["ddp_error"] = str(err)
    opt = hd.KFAC(model, samples=hi - lo, loss_fn=loss_fn, fisher="type-2")
    try:  # rank 0 forgets the batch that type-2 factors need: it says so, the others stop
        _train(opt, model, loss_fn, x[lo:hi], y[lo:hi], 1, rank != 0)
    except Exception as err:
        out["batch_error"] = f"{type(err).__name__}: {err}"
    try:
        hd.KFACOperator(model, loss_fn, [])
    except Exception as err:
        out["empty_error"] = f"{type(err).__name__}: {err}"


def raises(rank, world, out):
    """Rank 1's data is broken (a class index out of range): CrossEntropyLoss raises there,
    in the middle of a Lanczos run; then an optimizer's closure raises on rank 1."""
    model, loss_fn, x, y = problem()
    lo, hi = shard_bounds(rank, world)
    yb = y[lo:hi].clone()
    H = hd.HessianOperator(model, loss_fn, batches(x[lo:hi], yb))
    if rank == 1:
        H.data[-1] = (H.data[-1][0], torch.full_like(H.data[-1][1], C + 5))
    for linearize in (False, True):  # in a product, and in linearize()
        try:
            hesse.eigenvalues(H, k=1, seed=0, linearize=linearize)
        except Exception as err:
            out[f"eig_error_{linearize}"] = f"{type(err).__name__}: {err}"
    # rank 1's targets hold a NaN: a squared error's GGN does not see them, its loss does
    targets = torch.zeros(hi - lo, C)
    if rank == 1:
        targets[0, 0] = float("nan")
    G = hd.GGNOperator(model, torch.nn.MSELoss(), (x[lo:hi], targets))
    try:
        G @ torch.ones(G.shape[0])
    except Exception as err:
        out["nan_loss_error"] = f"{type(err).__name__}: {err}"
    opt = hd.LBFGS(model.parameters(), samples=hi - lo)

    def closure():
        opt.zero_grad()
        if rank == 1:
            raise ValueError("rank 1's closure is broken")
        loss = loss_fn(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except Exception as err:
        out["opt_error"] = f"{type(err).__name__}: {err}"
    try:  # a bad hyper-parameter on rank 1 only
        hd.HessianFree(model.parameters(), lr=-1.0 if rank == 1 else 1.0, samples=hi - lo)
    except Exception as err:
        out["make_error"] = f"{type(err).__name__}: {err}"
    sophia = hd.Sophia(model.parameters(), estimator="gnb", samples=hi - lo)
    try:  # rank 1 forgets outputs_fn on a refresh step
        sophia.step(
            closure if rank != 1 else lambda: None,
            outputs_fn=None if rank == 1 else (lambda: model(x[lo:hi])),
        )
    except Exception as err:
        out["sophia_error"] = f"{type(err).__name__}: {err}"
    # out of step: rank 1's reduction is at another place of its sequence
    comm = hd.Communicator(timeout=10.0)
    try:
        comm.sum_weighted(torch.ones(3), 1.0, None, "a test reduction", tag=7 + (rank == 1))
    except Exception as err:
        out["step_error"] = f"{type(err).__name__}: {err}"
    # ... at another call site (an optimizer's tags: site, step, call): named
    from hesse.distributed._comm import site

    where = "the line search" if rank == 1 else "the start of a step"
    try:
        comm.sum_weighted(torch.ones(3), 1.0, None, "a test reduction", tag=(site(where), 4, 2))
    except Exception as err:
        out["site_error"] = f"{type(err).__name__}: {err}"
    # an operator's own collectives are tagged by call site too: rank 1 makes one GGN
    # product more where the others make a Hessian product, and the operand check names
    # where each rank was
    comm = hd.Communicator(timeout=10.0)
    shard = batches(x[lo:hi], y[lo:hi])
    G, H = (cls(model, loss_fn, shard, group=comm) for cls in (hd.GGNOperator, hd.HessianOperator))
    v = torch.ones(G.shape[0])
    G @ v
    try:
        (G if rank == 1 else H) @ v
    except Exception as err:
        out["product_error"] = f"{type(err).__name__}: {err}"


def edges(rank, world, out):
    """Rank 1 holds no data at all; then rank 1's model differs from rank 0's."""
    model, loss_fn, x, y = problem()
    data = batches(x, y) if rank == 0 else []
    H = hd.HessianOperator(model, loss_fn, data)
    V = out["V"] = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(3))
    out["hv"] = H @ V
    out["eig"] = hesse.eigenvalues(H, k=1, seed=0, tol=1e-8).eigenvalues
    out["loss"], out["grad"] = hd.loss_and_gradient(model, loss_fn, data)
    opt = hd.LBFGS(model.parameters(), samples=N if rank == 0 else 0, max_iter=3)

    def closure():
        if rank != 0:
            raise AssertionError("a rank with samples=0 must not run its closure")
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    out["x"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    kept = opt.samples
    opt.step(closure, samples=opt.samples)  # an override lasts one step
    out["samples_kept"] = opt.samples == kept
    if rank == 0:
        ref_model = problem()[0]
        out["ref_hv"] = hesse.HessianOperator(ref_model, loss_fn, (x, y)) @ V
        out["ref_x"] = _reference_lbfgs(ref_model, loss_fn, x, y, 3)
    try:  # a DDP-wrapped model in an optimizer: refused (it would reduce twice)
        ddp = nn.parallel.DistributedDataParallel(model)
        hd.HessianFree(model.parameters(), model=ddp, loss_fn=loss_fn, samples=1)
    except ValueError as err:
        out["ddp_error"] = str(err)
    # every shard empty: a clear error on every rank
    try:
        hd.GGNOperator(model, loss_fn, []) @ V[:, 0]
    except Exception as err:
        out["empty_error"] = f"{type(err).__name__}: {err}"
    # rank 1's model is bigger: refused on every rank (not a gloo abort)
    other = nn.Sequential(nn.Linear(D, 6 + rank), nn.Tanh(), nn.Linear(6 + rank, C))
    try:
        hd.GGNOperator(other, loss_fn, data)
    except Exception as err:
        out["size_error"] = f"{type(err).__name__}: {err}"
    opt = hd.LBFGS(other.parameters(), samples=1)
    try:
        opt.step(lambda: torch.zeros(()))
    except Exception as err:
        out["opt_size_error"] = f"{type(err).__name__}: {err}"
    # rank 1's parameters differ: refused on every rank
    if rank == 1:
        with torch.no_grad():
            model[0].bias[2] += 1e-3
    try:
        hd.GGNOperator(model, loss_fn, data)
    except Exception as err:
        out["mismatch_error"] = f"{type(err).__name__}: {err}"


def disagree(rank, world, out):
    """The ranks disagree on what to multiply: different column counts, different vectors,
    different trace budgets and seeds; a closure that never calls backward() on rank 1.
    Every rank must raise the same clear error (never a gloo abort or a wrong number), and
    the operator must still work afterwards."""
    model, loss_fn, x, y = problem()
    lo, hi = shard_bounds(rank, world)
    H = hd.HessianOperator(model, loss_fn, batches(x[lo:hi], y[lo:hi]))
    P = H.shape[0]
    gen = torch.Generator().manual_seed(5)
    V = torch.randn(P, 3, generator=gen)
    cases = {
        "columns": lambda: H @ (V[:, :1] if rank == 0 else V),
        "vectors": lambda: H @ (V[:, 0] + (1e-3 if rank == world - 1 else 0.0)),
        "budget": lambda: hesse.trace(H, num_matvecs=12 if rank == 0 else 24, seed=0),
    }
    for name, run in cases.items():
        try:
            run()
            out[f"{name}_error"] = None
        except Exception as err:
            out[f"{name}_error"] = f"{type(err).__name__}: {err}"
    # a seed that differs is not an error: the draws follow rank 0's generator
    out["eig_seeds"] = hesse.eigenvalues(H, k=1, seed=rank, linearize=False).eigenvalues
    out["hv_after"] = H @ V  # still in step with the others
    if rank == 0:
        out["ref_hv_after"] = hesse.HessianOperator(problem()[0], loss_fn, (x, y)) @ V
    opt = hd.LBFGS(model.parameters(), samples=hi - lo)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x[lo:hi]), y[lo:hi])
        if rank != 1:
            loss.backward()
        return loss

    try:
        opt.step(closure)
        out["backward_error"] = None
    except Exception as err:
        out["backward_error"] = f"{type(err).__name__}: {err}"


def precision(rank, world, out):
    """Sample counts past 4096 in float32, float16 sums past float16's range, a sum loss,
    and a 0-row tensor shard, each against one process on all the data."""
    gen = torch.Generator().manual_seed(5)
    n0, n1 = 4500, 5600  # counts above 4096 use both digits of the packed count
    x = torch.randn(n0 + n1, 3, generator=gen, dtype=torch.float32)
    y = torch.randn(n0 + n1, 2, generator=gen, dtype=torch.float32)
    lo, hi = (0, n0) if rank == 0 else (n0, n0 + n1)
    torch.manual_seed(1)
    lin = nn.Linear(3, 2).float()
    v = torch.randn(8, generator=gen, dtype=torch.float32)
    for name, loss_fn in (("mean", nn.MSELoss()), ("sum", nn.MSELoss(reduction="sum"))):
        shard = [(x[i : min(i + 1000, hi)], y[i : min(i + 1000, hi)]) for i in range(lo, hi, 1000)]
        out[f"f32_{name}"] = hd.HessianOperator(lin, loss_fn, shard) @ v
        if rank == 0:
            out[f"ref_f32_{name}"] = hesse.HessianOperator(lin, loss_fn, (x, y)) @ v
    # float16: 6000 samples per rank, |G v| * 6000 overflows float16 (65504)
    half = nn.Linear(3, 2).half()
    with torch.no_grad():
        half.weight.fill_(4.0)
    xh = (4 * torch.randn(12000, 3, generator=gen)).half()
    yh = torch.randn(12000, 2, generator=gen).half()
    vh = torch.ones(8, dtype=torch.float16)
    sl = slice(0, 6000) if rank == 0 else slice(6000, 12000)
    out["f16"] = hd.GGNOperator(half, nn.MSELoss(), (xh[sl], yh[sl])) @ vh
    if rank == 0:
        out["ref_f16"] = hesse.GGNOperator(half, nn.MSELoss(), (xh, yh)) @ vh
    # a 0-row tensor shard on rank 1 (as x[rank::world] gives when world > len(x))
    model, loss_fn, xs, ys = problem()
    data = (xs, ys) if rank == 0 else (xs[:0], ys[:0])
    P = sum(p.numel() for p in model.parameters())
    w = torch.randn(P, generator=gen)
    out["empty_fisher"] = hd.FisherOperator(model, loss_fn, data) @ w
    out["empty_hessian"] = hd.HessianOperator(model, loss_fn, data) @ w
    out["empty_loss"], out["empty_grad"] = hd.loss_and_gradient(model, loss_fn, data)
    if rank == 0:
        out["ref_empty_fisher"] = hesse.FisherOperator(model, loss_fn, data) @ w
        out["ref_empty_hessian"] = hesse.HessianOperator(model, loss_fn, data) @ w
    # HessianFree with the batch only on rank 0 (rank 1: samples=0 and batch=None)
    opt = hd.HessianFree(model.parameters(), model=model, loss_fn=loss_fn, samples=len(data[0]))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure, batch=data if rank == 0 else None)
    out["hf_x"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if rank == 0:
        ref_model = problem()[0]
        ref = hesse.optim.HessianFree(ref_model.parameters(), model=ref_model, loss_fn=loss_fn)

        def ref_closure():
            ref.zero_grad()
            loss = loss_fn(ref_model(xs), ys)
            loss.backward()
            return loss

        for _ in range(3):
            ref.step(ref_closure, batch=(xs, ys))
        out["ref_hf_x"] = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
    # closure-only curvature (the Hessian through the closure) with rank 1 empty
    model2 = problem()[0]
    opt = hd.HessianFree(
        model2.parameters(),
        model=model2,
        loss_fn=loss_fn,
        curvature="hessian",
        samples=len(data[0]),
    )

    def closure2():
        opt.zero_grad()
        loss = loss_fn(model2(data[0]), data[1])
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure2)
    out["hf2_x"] = torch.cat([p.detach().reshape(-1) for p in model2.parameters()])
    if rank == 0:
        ref_model = problem()[0]
        ref = hesse.optim.HessianFree(
            ref_model.parameters(), model=ref_model, loss_fn=loss_fn, curvature="hessian"
        )

        def ref_closure2():
            ref.zero_grad()
            loss = loss_fn(ref_model(xs), ys)
            loss.backward()
            return loss

        for _ in range(2):
            ref.step(ref_closure2)
        out["ref_hf2_x"] = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
    # SubsampledNewton with 5 samples of each rank: the ranks agree on every step
    opt = hd.SubsampledNewton(
        model.parameters(), model=model, loss_fn=loss_fn, subsample=5, samples=len(data[0])
    )
    for _ in range(3):
        opt.step(closure, batch=data)
    out["sub_x"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # ... and with three iterations per step, the batch only on rank 0 (rank 1: samples=0,
    # batch=None): rank 0 draws the subsample one process draws (its seed is the
    # optimizer's own), so both take one process's iterates on rank 0's data
    model3 = problem()[0]
    opt = hd.SubsampledNewton(
        model3.parameters(),
        model=model3,
        loss_fn=loss_fn,
        subsample=5,
        max_iter=3,
        seed=11,
        samples=len(data[0]),
    )

    def closure3():
        opt.zero_grad()
        loss = loss_fn(model3(data[0]), data[1])
        loss.backward()
        return loss

    out["sub3_x0"] = torch.cat([p.detach().reshape(-1) for p in model3.parameters()])
    for _ in range(2):
        opt.step(closure3, batch=data if rank == 0 else None)
    out["sub3_x"] = torch.cat([p.detach().reshape(-1) for p in model3.parameters()])
    if rank == 0:
        ref_model = problem()[0]
        ref = hesse.optim.SubsampledNewton(
            ref_model.parameters(),
            model=ref_model,
            loss_fn=loss_fn,
            subsample=5,
            max_iter=3,
            seed=11,
        )

        def ref_closure3():
            ref.zero_grad()
            loss = loss_fn(ref_model(xs), ys)
            loss.backward()
            return loss

        for _ in range(2):
            ref.step(ref_closure3, batch=(xs, ys))
        out["ref_sub3_x"] = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])


def hangs(rank, world, out):
    """Rank 1 stops answering (sleeps); the others must give up within the timeout."""
    model, loss_fn, x, y = problem()
    lo, hi = shard_bounds(rank, world)
    H = hd.HessianOperator(model, loss_fn, (x[lo:hi], y[lo:hi]), timeout=2.0)
    if rank == 1:
        time.sleep(float(os.environ.get("HANG_SECONDS", "60")))
    start = time.perf_counter()
    try:
        hesse.eigenvalues(H, k=1, seed=0)
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    out["waited"] = time.perf_counter() - start


def exits(rank, world, out):
    """Rank 1's process dies in the middle; the others must end with an error."""
    model, loss_fn, x, y = problem()
    lo, hi = shard_bounds(rank, world)
    H = hd.GGNOperator(model, loss_fn, (x[lo:hi], y[lo:hi]), timeout=30.0)
    if rank == 1:
        H @ torch.ones(H.shape[0])
        os._exit(7)
    try:
        for _ in range(3):
            H @ torch.ones(H.shape[0])
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"


def nccl(rank, world, out):
    """The nccl backend on CUDA tensors (one GPU per rank): products, an eigenvalue, a trace
    and three L-BFGS steps over the shards, against one process on all the data."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    model, loss_fn, x, y = problem()
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    lo, hi = shard_bounds(rank, world)
    H = hd.HessianOperator(model, loss_fn, batches(x[lo:hi], y[lo:hi]))
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2)).to(dev)
    out["hv"] = (H @ V).cpu()
    out["eig"] = hesse.eigenvalues(H, k=1, seed=0, tol=1e-10).eigenvalues.cpu()
    out["trace"] = hesse.trace(H, "hutchinson", 20, seed=0).estimate
    opt = hd.LBFGS(model.parameters(), samples=hi - lo, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    out["x"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    out["seconds_in_collectives"] = H.comm.seconds
    if rank == 0:
        ref_model = problem()[0].to(dev)
        Hf = hesse.HessianOperator(ref_model, loss_fn, (x, y))
        out["ref_hv"] = (Hf @ V).cpu()
        out["ref_eig"] = hesse.eigenvalues(Hf, k=1, seed=0, tol=1e-10).eigenvalues.cpu()
        out["ref_trace"] = hesse.trace(Hf, "hutchinson", 20, seed=0).estimate
        out["ref_x"] = _reference_lbfgs(ref_model, loss_fn, x, y, 2).cpu()


def _reference_lbfgs(model, loss_fn, x, y, steps: int) -> torch.Tensor:
    """One process's L-BFGS (max_iter=3 per step) on all the data: the flat parameters
    after ``steps`` steps, the reference of the data-parallel runs."""
    ref = hesse.optim.LBFGS(model.parameters(), max_iter=3)

    def closure():
        ref.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        ref.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # here, not at import: pytest imports this file
    dist.init_process_group(
        os.environ.get("BACKEND", "gloo"),
        init_method=f"file://{os.environ['STORE']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    out: dict = {}
    try:
        globals()[scenario](rank, world, out)
    except BaseException as err:
        out["uncaught"] = "".join(traceback.format_exception(err))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    if scenario in ("operators", "optimizers", "edges", "precision", "disagree", "kfac", "nccl"):
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
