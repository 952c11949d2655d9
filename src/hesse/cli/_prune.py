"""``hesse prune``: accuracy and loss against sparsity, for each pruning method
(:func:`hesse.prune`), on a built-in problem or a user's file."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hesse
from hesse.cli._common import (
    Output,
    Timer,
    UserError,
    integer,
    nonnegative,
    parse_device,
    parse_dtype,
)
from hesse.cli._targets import USER_FILE_HELP, is_file, load_user_file
from hesse.compress import METHODS, prune
from hesse.compress._diagonal import covered, ggn_diagonal
from hesse.compress._layers import select_layers
from hesse.compress._mask import parse_pattern
from hesse.problems import PROBLEMS, Problem, problem

DEFAULT_METHODS = ("magnitude", "obd", "layer-obs", "sparsegpt")
DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION = 512


def add_prune(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prune",
        parents=[parent],
        help="prune a model with Hessian-based methods: accuracy and loss against sparsity",
        description="Prune TARGET with each method at each sparsity, without fine-tuning "
        "(hesse.prune), and report the test metric and the loss. A built-in problem's "
        "network is trained first (Adam, full batch, seeded) and calibrated on --calibration "
        "samples of its training set; a user's file is pruned as it is, calibrated on its "
        "data. Without --out nothing is written; with it, prune.json and prune.png.",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help=f"a built-in data problem (see `hesse problems`), or {USER_FILE_HELP}",
    )
    p.add_argument(
        "--methods",
        metavar="LIST",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods among {', '.join(METHODS)} (default "
        f"{','.join(DEFAULT_METHODS)}; obs holds a dense inverse: small models only)",
    )
    p.add_argument(
        "--sparsities",
        metavar="LIST",
        help="comma-separated sparsities in [0, 1) (default "
        f"{','.join(map(str, DEFAULT_SPARSITIES))})",
    )
    p.add_argument(
        "--pattern",
        metavar="N:M",
        help="N:M semi-structured sparsity instead of --sparsities; without --layers, the "
        "layers whose inputs per output are not a multiple of M are left dense (noted)",
    )
    p.add_argument(
        "--layers",
        metavar="NAMES",
        help="comma-separated module names of the layers to prune (default: every nn.Linear, "
        "nn.Conv2d and Conv1D whose weight is its own; see `hesse.compress.default_layers`)",
    )
    p.add_argument(
        "--damping",
        type=nonnegative,
        default=0.01,
        help="relative damping of the OBS methods (0.01)",
    )
    p.add_argument(
        "--train-steps",
        type=integer(0),
        default=500,
        metavar="N",
        help="Adam steps that train a built-in problem's model before pruning (500)",
    )
    p.add_argument(
        "--diagonal",
        choices=("exact", "hutchinson", "xdiag"),
        default="exact",
        help="how obd gets the GGN's diagonal: exact (one product per weight), or estimated "
        "from --matvecs products (default exact)",
    )
    p.add_argument(
        "--matvecs",
        type=integer(),
        default=100,
        metavar="N",
        help="products of an estimated diagonal (100)",
    )
    p.add_argument(
        "--calibration",
        type=integer(0),
        default=CALIBRATION,
        metavar="N",
        help=f"training samples a built-in problem is calibrated on, drawn with --seed "
        f"({CALIBRATION}; 0: all)",
    )
    p.set_defaults(run=run_prune)


def _parse(args: argparse.Namespace) -> tuple[list[str], list[float | None]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods must list methods among {', '.join(METHODS)}, got {bad}")
    if args.pattern is not None:
        try:
            parse_pattern(args.pattern)
        except ValueError as err:
            raise UserError(f"--pattern: {err}") from err
        if args.sparsities is not None:
            raise UserError("--pattern N:M sets the sparsity (1 - N/M): drop --sparsities")
        return methods, [None]
    try:
        text = args.sparsities or ",".join(map(str, DEFAULT_SPARSITIES))
        sparsities = [float(s) for s in text.split(",")]
    except ValueError as err:
        raise UserError(f"--sparsities must be numbers in [0, 1), got {args.sparsities!r}") from err
    if not all(0 <= s < 1 for s in sparsities):
        raise UserError(f"--sparsities must be numbers in [0, 1), got {args.sparsities!r}")
    return methods, sparsities


def train(p: Problem, model: nn.Module, steps: int, lr: float = 1e-2) -> None:
    """Full-batch Adam on the training objective (loss and penalty)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    X, y = p.train
    for _ in range(steps):
        opt.zero_grad()
        loss = p.loss_fn(model(X), y)
        penalty = p.regularizer(model)
        (loss if penalty is None else loss + penalty).backward()
        opt.step()
    model.eval()


@torch.no_grad()
def evaluate(p: Problem | None, model: nn.Module) -> dict[str, float | None]:
    """Test loss and metric of a built-in problem's model (``None`` for a user's file)."""
    if p is None:
        return {"test_loss": None, "test_metric": None}
    out = model(p.test[0])
    return {"test_loss": float(p.loss_fn(out, p.test[1])), "test_metric": p.metric(out, p.test[1])}


def _load(
    args: argparse.Namespace, ui: Output
) -> tuple[str, nn.Module, Any, Any, Any, Problem | None]:
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    name = args.target
    if is_file(name):
        model, loss_fn, data, io = load_user_file(name, device, dtype, args.device != "cpu")
        return name, model.eval(), loss_fn, data, io, None
    if name not in PROBLEMS:
        raise UserError(
            f"{name!r} is neither a built-in data problem ({', '.join(PROBLEMS)}) nor a file; "
            f"give {USER_FILE_HELP}"
        )
    p = problem(name, dtype, device)
    torch.manual_seed(args.seed)
    model = p.make_model()
    with ui.progress(f"training {name} (Adam, {args.train_steps} full-batch steps)"):
        train(p, model, args.train_steps)
    X, y = p.train
    if 0 < args.calibration < X.shape[0]:
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(X.shape[0], generator=g)[: args.calibration].to(X.device)
        X, y = X[idx], y[idx]
    return name, model, p.loss_fn, (X, y), None, p


def _layers(args: argparse.Namespace, model: nn.Module) -> tuple[list[str], list[dict[str, Any]]]:
    """The layers to prune, and those a pattern leaves out: ``--layers`` as given (a pattern
    that does not fit one is an error), or the default layers that the pattern fits."""
    nm = parse_pattern(args.pattern)  # checked by _parse
    try:
        if args.layers is not None:
            names = [n.strip() for n in args.layers.split(",") if n.strip()]
            if not names:
                raise UserError(f"--layers must name at least one module, got {args.layers!r}")
            layers = select_layers(model, names)
        else:
            layers = select_layers(model, None)
    except (ValueError, TypeError) as err:
        raise UserError(f"--layers: {err}" if args.layers is not None else str(err)) from err
    skipped = []
    if nm is not None:
        for layer in layers:
            inputs = layer.shape[1]
            if inputs % nm[1] == 0:
                continue
            if args.layers is not None:
                raise UserError(
                    f"--pattern {args.pattern} needs inputs per output divisible by {nm[1]}, "
                    f"but layer {layer.name!r} of --layers has {inputs}: leave it out of "
                    "--layers (or leave --layers out to skip such layers)"
                )
            skipped.append(
                {
                    "name": layer.name,
                    "inputs": inputs,
                    "reason": f"pattern {args.pattern}: {inputs} inputs per output, not a "
                    f"multiple of {nm[1]}",
                }
            )
    names = [layer.name for layer in layers if layer.name not in {s["name"] for s in skipped}]
    if not names:
        raise UserError(
            f"--pattern {args.pattern} fits none of the layers "
            f"({', '.join(s['name'] + ': ' + str(s['inputs']) for s in skipped)} inputs per "
            "output)"
        )
    return names, skipped


def run_prune(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse prune TARGET``."""
    methods, sparsities = _parse(args)
    timer = Timer()
    name, model, loss_fn, data, io, p = _load(args, ui)
    names, skipped = _layers(args, model)
    for s in skipped:
        ui.print(f"note: layer {s['name']!r} left dense ({s['reason']})")
    metric = p.metric_name if p is not None else None
    dense = {"method": "dense", "sparsity": 0.0, **evaluate(p, model)}
    diag = None
    if "obd" in methods:  # the curvature's diagonal, once for every sparsity
        layers = select_layers(model, names)
        if args.diagonal == "exact" and covered(layers, loss_fn):
            with ui.progress("the exact diagonal of the GGN (backpropagated columns)"):
                diag = ggn_diagonal(model, loss_fn, data, layers, io)
        else:
            weights = [layer.weight for layer in layers]
            op = hesse.GGNOperator(model, loss_fn, data, params=weights, io=io)
            n = op.shape[0] if args.diagonal == "exact" else args.matvecs
            with ui.progress(f"the {args.diagonal} diagonal of the GGN ({n:,} products)"):
                diag = hesse.diagonal(
                    op, args.diagonal, num_matvecs=args.matvecs, seed=args.seed
                ).estimate
    runs: list[dict[str, Any]] = []
    with ui.progress("pruning", total=len(methods) * len(sparsities)) as advance:
        for method in methods:
            for s in sparsities:
                advance(0, f"{method} at {'pattern ' + args.pattern if s is None else s}")
                pruned = copy.deepcopy(model)
                report = prune(
                    pruned, loss_fn, data, method=method, sparsity=s, pattern=args.pattern,
                    params=names, io=io, damping=args.damping, seed=args.seed,
                    **({"diagonal": diag} if method == "obd" else {}),
                )  # fmt: skip
                dense.setdefault("loss", report.loss_before)
                runs.append(
                    {
                        "method": method,
                        "sparsity": s,
                        "reached": report.sparsity,
                        "pattern": report.pattern,
                        "loss": report.loss_after,
                        "predicted": report.predicted,
                        **evaluate(p, pruned),
                        "time_s": report.seconds,
                        "layers": report.as_dicts(),
                    }
                )
                advance()
    _tables(dense, runs, methods, metric, ui)
    if skipped:
        ui.table(
            "Layers left dense",
            ["layer", "inputs per output", "why"],
            [[s["name"], s["inputs"], s["reason"]] for s in skipped],
        )
    results: dict[str, Any] = {
        "command": "prune",
        "target": name,
        "kind": "file" if p is None else "problem",
        "metric": metric,
        "train_steps": args.train_steps if p is not None else None,
        "damping": args.damping,
        "dtype": str(next(model.parameters()).dtype).split(".")[-1],
        "device": args.device,
        "seed": args.seed,
        "hesse_version": hesse.__version__,
        "layers": names,
        "skipped_layers": skipped,
        "dense": dense,
        "runs": runs,
    }
    results["time_s"] = timer.seconds
    ui.write_json("prune.json", results)
    path = ui.path("prune.png")
    if path is not None:
        figure(results, path, f"Pruning {name} without fine-tuning")
    return results


def _tables(dense, runs, methods, metric, ui: Output) -> None:
    where = "the calibration data" if metric is None else "the training set"
    levels = list(dict.fromkeys(r["pattern"] or r["sparsity"] for r in runs))
    columns = ["method", *[str(v) if isinstance(v, str) else f"{v:.0%}" for v in levels]]

    def grid(key: str) -> list[list[Any]]:
        rows = [["dense", *[dense[key]] * len(levels)]]
        for m in methods:
            by_level = {r["pattern"] or r["sparsity"]: r[key] for r in runs if r["method"] == m}
            rows.append([m, *[by_level.get(v) for v in levels]])
        return rows

    if metric is not None:
        ui.table(f"Test {metric} against sparsity (no fine-tuning)", columns, grid("test_metric"))
    ui.table(f"Loss on {where} against sparsity", columns, grid("loss"))


def figure(results: dict[str, Any], path: Path, title: str) -> None:
    """The test metric (or the loss, for a user's file) against sparsity, one line per
    method, the dense model as a dashed line."""
    from hesse.cli._figures import _plt, _save

    plt = _plt()
    key = "test_metric" if results["metric"] is not None else "loss"
    label = f"test {results['metric']}" if key == "test_metric" else "loss on the data"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["method"] == method]
        x = np.array([r["reached"] for r in rows])
        ax.plot(100 * x, [r[key] for r in rows], "o-", ms=4, lw=1.5, label=method)
    ax.axhline(results["dense"][key], color="black", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    ax.set_title(title)
    _save(fig, path)
