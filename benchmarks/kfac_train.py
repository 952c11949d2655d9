"""Time to accuracy of hesse.optim.KFAC against SGD with momentum and Adam on the digits CNN.

The built-in problem ``cnn-digits`` (conv3x3(8)-conv3x3(16, stride 2)-linear, tanh,
cross-entropy with label smoothing 0.1; 1347 training and 450 test images), mini-batches of
64, through ``hesse.optim.compare``: the same initial weights and batch order for every
optimizer, the clock counting only the optimizers' steps. Each optimizer runs at each
setting of a small grid; the table gives, for the best setting of each (the least time to
the target), the wall-clock seconds and epochs until the training loss first reaches the
target, and the test accuracy then and at the end of the budget.

KFAC runs two ways: from a plain closure (factors of the empirical Fisher, as
kfac-pytorch's default), and with ``loss_fn`` and the batch (type-2 factors, the exact
GGN's). Its inverses are refreshed every 10 steps (``inverse_each``), its factors every step;
damping 0.03 and kl_clip 1e-3 (kfac-pytorch's default clip), momentum 0.9.

Run from the repository root (2 threads)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/kfac_train.py          # about 15 minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/kfac_train.py --quick  # about 3 minutes

Results: ``benchmarks/results/kfac_train.json`` and ``kfac_train.png`` (``_quick`` in the
names with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from _harness import RESULTS, finish, machine, print_header, print_table, write_json
from hesse.optim import KFAC, compare
from hesse.problems import problem


def grid(loss_fn) -> dict:
    """name -> (family, factory) for every setting tried."""
    out = {}
    for lr in (0.1, 0.3):
        out[f"SGD momentum 0.9 (lr={lr})"] = (
            "SGD momentum",
            lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        )
    for lr in (1e-3, 3e-3):
        out[f"Adam (lr={lr})"] = ("Adam", lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr))
    for lr in (0.1, 0.3):
        common = {"lr": lr, "damping": 0.03, "momentum": 0.9, "inverse_each": 10, "kl_clip": 1e-3}
        out[f"KFAC empirical (lr={lr})"] = (
            "KFAC empirical",
            lambda m, common=common: KFAC(m, **common),
        )
        out[f"KFAC type-2 (lr={lr})"] = (
            "KFAC type-2",
            lambda m, common=common: KFAC(m, **common, loss_fn=loss_fn, fisher="type-2"),
        )
    return out


def first_reach(curve, target: float) -> tuple[float, float, float] | None:
    """(seconds, epochs, test metric) where the training loss first reaches ``target``."""
    for t, e, loss, test in zip(curve.time, curve.epoch, curve.loss, curve.test):
        if loss <= target:
            return t, e, test
    return None


def plot(curves: dict, best: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in best.values():
        c = curves[name]
        ax1.plot(c["time"], c["loss"], label=name)
        ax2.plot(c["time"], c["test"], label=name)
    ax1.axhline(target, color="grey", ls=":", lw=1)
    ax1.set(xlabel="seconds", ylabel="training loss", yscale="log", title="cnn-digits")
    ax2.set(xlabel="seconds", ylabel="test accuracy", ylim=(0.5, 1.0))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs, one setting each")
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument(
        "--target", type=float, default=0.6, help="training-loss target (the floor is 0.50)"
    )
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = ap.parse_args()
    if args.out is None:
        args.out = RESULTS / f"kfac_train{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(2)
    meta = machine("cpu")
    print_header(meta)
    prob = problem("cnn-digits")
    (xtr, ytr), (xte, yte) = prob.train, prob.test
    runs = grid(prob.loss_fn)
    if args.quick:
        keep = ("SGD momentum 0.9 (lr=0.1)", "Adam (lr=0.003)", "KFAC type-2 (lr=0.1)")
        runs = {k: v for k, v in runs.items() if k in keep}
    epochs = 3.0 if args.quick else args.epochs
    curves = compare(
        prob.make_model, prob.loss_fn, (xtr, ytr), {k: f for k, (_, f) in runs.items()},
        epochs=epochs, batch_size=64, test_data=(xte, yte), metric=prob.metric,
        evals_per_epoch=4, seed=0,
    )  # fmt: skip
    rows, best = {}, {}
    for name, c in curves.items():
        hit = first_reach(c, args.target)
        rows[name] = {
            "family": runs[name][0],
            "seconds_to_target": None if hit is None else hit[0],
            "epochs_to_target": None if hit is None else hit[1],
            "test_at_target": None if hit is None else hit[2],
            "final_loss": c.loss[-1],
            "final_test": c.test[-1],
            "seconds_total": c.time[-1],
            "diverged": c.diverged,
        }
        fam = runs[name][0]
        t = rows[name]["seconds_to_target"]
        prev = best.get(fam)
        if prev is None or (t is not None and (rows[prev]["seconds_to_target"] or math.inf) > t):
            best[fam] = name
    shown = ("seconds_to_target", "epochs_to_target", "test_at_target", "final_test")
    columns = [
        ("best setting", "<32"),
        ("s to target", "11.2f"),
        ("epochs", "7.2f"),
        ("test then", "9.3f"),
        ("test end", "8.3f"),
    ]
    print_table(
        f"cnn-digits, batches of 64, {epochs:g} epochs, target training loss {args.target}",
        columns,
        [[name, *(rows[name][k] for k in shown)] for name in best.values()],
    )
    result = {
        "meta": finish(meta),
        "problem": prob.description,
        "batch_size": 64,
        "epochs": epochs,
        "target_loss": args.target,
        "runs": rows,
        "best": best,
        "curves": {
            k: {"time": c.time, "epoch": c.epoch, "loss": c.loss, "test": c.test}
            for k, c in curves.items()
        },
    }
    write_json(args.out, result)
    plot(result["curves"], best, args.target, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
