"""KFAC and EKFAC: hesse against curvlinops on the digits MLP and CNN.

For ``mlp-digits`` (64-64-10, tanh) and ``cnn-digits`` (two 3x3 convolutions and a linear
head) of :mod:`hesse.problems`, on the 1347 training digits in batches of 256 (float32,
cross-entropy with label smoothing 0.1, type-2 Fisher, weight and bias joint,
KFAC-expand), this times

* the factors: ``KFACOperator.update()`` against ``KFACLinearOperator
  .compute_kronecker_factors()`` (one pass over the data each), and EKFAC's factors with
  the eigenvalue refit (``EKFACOperator.update()`` against curvlinops' eigenvectors and
  ``compute_eigenvalue_correction()``);
* one product with a vector of length P, factors already computed;

and reports the ratios hesse / curvlinops of the median times (target <= 1.0) and the
largest difference of the factors (``A``, ``G``; EKFAC's eigenvalues) and of a product,
relative to the largest entry of each, computed in float64 on the first two batches
(target <= 1e-6). Then, unless ``--train-epochs 0``, a race on mlp-digits: the time to a
training loss of 0.6 of SGD with momentum, Adam and hesse.optim.KFAC (empirical Fisher
from the closure, or Monte-Carlo on the batch), each at the best setting of a small grid,
with :func:`hesse.optim.compare`. Timing follows :func:`_harness.time_calls`
(interleaved rounds in a random order, after warm-up).

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kfac.py   # a few minutes (curvlinops' EKFAC)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kfac.py --quick   # 1 round, 2 epochs

The figures go to ``benchmarks/results/kfac.json`` (``kfac_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch

from _harness import finish, machine, print_header, result_path, time_calls, write_json
from _peers import CURVLINOPS
from hesse.operators import EKFACOperator, KFACOperator
from hesse.problems import problem

BATCH = 256


def setup(name: str, device: torch.device, dtype: torch.dtype = torch.float32, batches=None):
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    pb = problem(name, dtype=dtype, device=device)
    torch.manual_seed(0)
    model = pb.make_model().eval()
    X, y = pb.train
    data = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(X), BATCH)][:batches]
    X = torch.cat([x for x, _ in data])
    params = [p for p in model.parameters() if p.requires_grad]
    common = dict(
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=len(X),
        num_per_example_loss_terms=1,
    )
    ops = {
        "kfac": (
            KFACOperator(model, pb.loss_fn, data),
            KFACLinearOperator(model, pb.loss_fn, params, data, **common),
        ),
        "ekfac": (
            EKFACOperator(model, pb.loss_fn, data),
            EKFACLinearOperator(model, pb.loss_fn, params, data, **common),
        ),
    }
    ops["kfac"][1].compute_kronecker_factors()
    ops["ekfac"][1]._maybe_compute_ekfac()
    gen = torch.Generator(device).manual_seed(0)
    v = torch.randn(ops["kfac"][0].shape[0], device=device, dtype=dtype, generator=gen)
    return ops, v, sum(p.numel() for p in params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def factor_errors(ops) -> dict[str, float]:
    hk, ck = ops["kfac"]
    he, ce = ops["ekfac"]
    A = max(rel(A, ck._input_covariances[m]) for m, (A, _) in hk.factors.items())
    G = max(rel(G, ck._gradient_covariances[m]) for m, (_, G) in hk.factors.items())
    E = max(rel(b.eigenvalues, ce._corrected_eigenvalues[b.module]) for b in he.blocks)
    return {"A": A, "G": G, "ekfac_eigenvalues": E}


def run(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    # the factors' agreement in float64, on the first two batches (in float32 the sums
    # over 1347 x 64 positions of a convolution differ by their rounding, ~1e-5)
    ops64, v64, _ = setup(name, device, torch.float64, batches=2)
    errors = factor_errors(ops64)
    errors["kfac_product"] = rel(ops64["kfac"][0] @ v64, ops64["kfac"][1] @ v64)
    errors["ekfac_product"] = rel(ops64["ekfac"][0] @ v64, ops64["ekfac"][1] @ v64)
    del ops64
    ops, v, P = setup(name, device)
    hk, ck = ops["kfac"]
    he, ce = ops["ekfac"]

    def ck_factors():
        ck._input_covariances, ck._gradient_covariances = {}, {}
        ck.compute_kronecker_factors()

    def ce_factors():
        for d in (
            ce._input_covariances,
            ce._gradient_covariances,
            ce._input_covariances_eigenvectors,
            ce._gradient_covariances_eigenvectors,
            ce._corrected_eigenvalues,
        ):
            d.clear()
        ce._maybe_compute_ekfac()

    factors = {
        "hesse kfac factors": hk.update,
        "curvlinops kfac factors": ck_factors,
        "hesse ekfac factors": he.update,
        "curvlinops ekfac factors": ce_factors,
    }
    products = {
        "hesse kfac product": lambda: hk @ v,
        "curvlinops kfac product": lambda: ck @ v,
        "hesse ekfac product": lambda: he @ v,
        "curvlinops ekfac product": lambda: ce @ v,
    }
    times = time_calls(factors, args.rounds, 1, device)
    times.update(time_calls(products, args.product_rounds, 5, device))
    med = {k: statistics.median(t) for k, t in times.items()}
    ratios = {
        f"{what} {kind}": med[f"hesse {what} {kind}"] / med[f"curvlinops {what} {kind}"]
        for what in ("kfac", "ekfac")
        for kind in ("factors", "product")
    }
    return {
        "parameters": P,
        "median_seconds": med,
        "ratio_hesse_over_curvlinops": ratios,
        "max_rel_difference_float64": errors,
    }


TARGET = 0.6  # training loss of mlp-digits (its floor, with label smoothing 0.1: 0.500)


def train(epochs: int) -> dict:
    """Time to a training loss of TARGET on mlp-digits (batches of 128, the same initial
    weights and batch order for all), each method at the best setting of a small grid."""
    from hesse.optim import KFAC, compare

    pb = problem("mlp-digits")

    def sgd(lr, m):
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    def adam(lr, m):
        return torch.optim.Adam(m.parameters(), lr=lr)

    def kfac(fisher, lr, damping, m):
        extra = {"loss_fn": pb.loss_fn, "fisher": fisher} if fisher == "mc" else {}
        return KFAC(m, lr=lr, damping=damping, momentum=0.9, inverse_each=5, **extra)

    grid = {f"sgd+momentum lr={lr}": partial(sgd, lr) for lr in (0.1, 0.3, 1.0, 2.0)}
    grid.update({f"adam lr={lr}": partial(adam, lr) for lr in (3e-3, 1e-2, 3e-2, 0.1, 0.3)})
    for fisher in ("empirical", "mc"):
        grid.update(
            {
                f"kfac {fisher} lr={lr} damping={d}": partial(kfac, fisher, lr, d)
                for lr in (0.03, 0.1, 0.3)
                for d in (0.03, 0.1, 0.3)
            }
        )
    curves = compare(
        pb.make_model,
        pb.loss_fn,
        pb.train,
        grid,
        epochs=epochs,
        batch_size=128,
        evals_per_epoch=4,
    )
    best: dict[str, dict] = {}
    for key, c in curves.items():
        method = key.split(" lr=")[0]
        row = {
            "setting": key,
            "time_to_target_s": c.time_to(TARGET),
            "final_loss": c.loss[-1],
            "seconds": c.time[-1],
            "steps_to_target": next((n for n, v in zip(c.steps, c.loss) if v <= TARGET), None),
        }
        if (
            method not in best
            or row["time_to_target_s"] < best[method]["time_to_target_s"]
            or (
                row["time_to_target_s"] == best[method]["time_to_target_s"]
                and row["final_loss"] < best[method]["final_loss"]
            )
        ):
            best[method] = row
    print(f"\nmlp-digits, time to training loss {TARGET} ({epochs} epochs, best of a grid)")
    for row in best.values():
        t, final = row["time_to_target_s"], row["final_loss"]
        steps = row["steps_to_target"]
        print(f"  {row['setting']:40s} {t:8.2f} s  {steps} steps  final {final:.3f}")
    return {"target_loss": TARGET, "epochs": epochs, "batch_size": 128, "best": best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds timing the factors")
    ap.add_argument("--product-rounds", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--train-epochs", type=int, default=10, help="0: skip the training race")
    ap.add_argument("--skip-operators", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 round, 5 product rounds, 2 epochs")
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.product_rounds = 1, 5
        args.train_epochs = min(args.train_epochs, 2)
    device = torch.device(args.device)
    meta = machine(device, (CURVLINOPS,))
    print_header(meta)
    out = {
        "meta": meta,
        "setup": f"digits train set (1347), batches of {BATCH}, float32, type-2, expand",
        "rounds": {"factors": args.rounds, "products": args.product_rounds},
        "models": {},
    }
    for name in () if args.skip_operators else ("mlp-digits", "cnn-digits"):
        res = run(name, device, args)
        out["models"][name] = res
        print(f"\n{name} (P = {res['parameters']})")
        print(f"  {'':18s} {'hesse ms':>10s} {'curvlinops ms':>14s} {'ratio':>7s}")
        for key, ratio in res["ratio_hesse_over_curvlinops"].items():
            what, kind = key.split()
            h = res["median_seconds"][f"hesse {what} {kind}"] * 1e3
            c = res["median_seconds"][f"curvlinops {what} {kind}"] * 1e3
            print(f"  {key:18s} {h:10.2f} {c:14.2f} {ratio:7.2f}")
        errs = res["max_rel_difference_float64"]
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        print(f"  max relative difference (float64): {diffs}")
    if args.train_epochs:
        out["training"] = train(args.train_epochs)
    finish(meta)
    if not args.no_save:
        write_json(result_path("kfac_quick" if args.quick else "kfac", args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
