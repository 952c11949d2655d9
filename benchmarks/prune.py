"""Pruning without fine-tuning: test accuracy against sparsity for each method of
:func:`hesse.prune`, and the time per layer of the layer-wise OBS methods against width.

Models:

* the digits MLP 64-64-10 and CNN of :mod:`hesse.problems` (``mlp-digits``, ``cnn-digits``,
  float32), trained with full-batch Adam (lr 1e-2, 500 steps, seed 0), pruned at 50 to 90 %
  and with the 2:4 pattern, calibrated on ``CALIBRATION`` training samples (seeded);
* the character-level GPT of ``examples/char_gpt_spectrum.py`` (about 30k parameters, 400
  AdamW steps), pruned at 50 and 70 %: next-character accuracy and loss on its fixed
  evaluation batches, calibrated on other batches (``--no-gpt`` skips it).

Every method prunes every linear and convolutional layer (GPT's output layer, tied to the
embedding, is left out), the same share of each; 2:4 leaves out the layers whose inputs
per output are not a multiple of 4 (the CNN's first convolution, 9). ``layer-obs`` spreads
each layer's removals over its rows (``allocation="layer"``, OBC); ``layer-obs-row``, the
same count in every row (``allocation="row"``), runs beside it on the digits models at
70 to 90 %. OBD's diagonal of the GGN on the calibration set is computed once per model
and shared by the sparsities: exact for the digits models, by backpropagating the columns
of the output Hessian's square root (``hesse.compress._diagonal``, far cheaper than one
product per weight: its time is ``obd_diagonal.seconds`` in the result file), and a
Hutchinson estimate from ``OBD_MATVECS`` products for the GPT (its loss is a function, whose
output Hessian has no closed-form root). Global OBS needs the dense inverse curvature of all
weights (4,736 for the MLP; slow); ``--obs`` adds it for the digits MLP.

Timing: one ``nn.Linear(d, d)`` at 50 % sparsity on ``4 d`` correlated inputs; the
seconds the method spends on the layer (``LayerPrune.seconds``: without the pass over the
data), the median of ``--rounds``.

Run::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prune.py            # a few minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prune.py --quick    # a short check

The figures go to ``benchmarks/results/prune.json`` (``prune_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hesse
from _harness import finish, machine, print_header, result_path, write_json
from hesse.compress import default_layers, prune
from hesse.compress._diagonal import ggn_diagonal
from hesse.compress._layers import select_layers
from hesse.problems import problem

METHODS = ("magnitude", "obd", "layer-obs", "sparsegpt")
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION = 512
TRAIN_STEPS = 500
OBD_MATVECS = 100
OBD_HUTCHINSON = {"method": "hutchinson", "num_matvecs": OBD_MATVECS, "seed": 0}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_gpt_spectrum.py"


def train(p, model: nn.Module, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = p.train
    for _ in range(steps):
        opt.zero_grad()
        p.loss_fn(model(X), y).backward()
        opt.step()
    model.eval()


def obd_diagonal(model, loss_fn, data, **kw) -> torch.Tensor:
    """The GGN's diagonal over the pruned weights, once per model."""
    if kw["method"] == "exact":
        return ggn_diagonal(model, loss_fn, data, select_layers(model, None))
    weights = [model.get_submodule(n).weight for n in default_layers(model)]
    op = hesse.GGNOperator(model, loss_fn, data, params=weights)
    return hesse.diagonal(op, **kw).estimate


#: Methods that are a method of hesse.prune with an option.
VARIANTS = {"layer-obs-row": ("layer-obs", {"allocation": "row"})}


def sweep(model, loss_fn, calib, evaluate, levels, methods, diag) -> list[dict[str, Any]]:
    """Each method at each level (a sparsity or a pattern) on a copy of ``model``."""
    runs = []
    names = default_layers(model)
    sizes = [model.get_submodule(n).weight.numel() for n in names]
    pieces = dict(zip(names, torch.split(diag, sizes)))
    for method in methods:
        base, options = VARIANTS.get(method, (method, {}))
        for level in levels:
            if base != method and (isinstance(level, str) or level < 0.7):
                continue  # the variant at 70 to 90 % only
            pruned = copy.deepcopy(model)
            kw = {"pattern": level} if isinstance(level, str) else {"sparsity": level}
            kw.update(options)
            if isinstance(level, str):  # the layers whose inputs the groups tile
                m = int(level.split(":")[1])
                kw["params"] = [
                    n for n in names if model.get_submodule(n).weight[0].numel() % m == 0
                ]
            if method == "obd":  # the entries of the pruned layers
                chosen = kw.get("params", names)
                kw["diagonal"] = torch.cat([pieces[n] for n in chosen])
            report = prune(pruned, loss_fn, calib, method=base, **kw)
            row = {
                "method": method,
                "level": level,
                "sparsity": report.sparsity,
                **evaluate(pruned),
                "calibration_loss": report.loss_after,
                "seconds": report.seconds,
            }
            runs.append(row)
            print(
                f"  {method:>9} {level!s:>4}: accuracy {row['accuracy']:.4f}, loss "
                f"{row['loss']:.4f} ({row['seconds']:.2f} s)",
                flush=True,
            )
    return runs


def digits(name: str, args: argparse.Namespace) -> dict[str, Any]:
    p = problem(name)
    torch.manual_seed(args.seed)
    model = p.make_model()
    train(p, model, TRAIN_STEPS)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(p.train[0].shape[0], generator=g)[:CALIBRATION]
    calib = (p.train[0][idx], p.train[1][idx])

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        out = m(p.test[0])
        return {"accuracy": p.metric(out, p.test[1]), "loss": float(p.loss_fn(out, p.test[1]))}

    dense = evaluate(model)
    print(f"{name}: dense accuracy {dense['accuracy']:.4f}", flush=True)
    tic = time.perf_counter()
    how = {"method": "exact"}
    diag = obd_diagonal(model, p.loss_fn, calib, **how)
    diag_s = time.perf_counter() - tic
    methods = METHODS + ("layer-obs-row",) + (("obs",) if args.obs and name == "mlp-digits" else ())
    levels = (0.5, 0.7, "2:4") if args.quick else (*SPARSITIES, "2:4")
    runs = sweep(model, p.loss_fn, calib, evaluate, levels, methods, diag)
    return {"dense": dense, "obd_diagonal": {**how, "seconds": diag_s}, "runs": runs}


def char_gpt(args: argparse.Namespace) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("char_gpt_spectrum", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    sys.modules["char_gpt_spectrum"] = ex
    spec.loader.exec_module(ex)
    text = ex.load_text()
    tok = ex.Tokenizer(text)
    ids = tok.encode(text)
    torch.manual_seed(args.seed)
    model = ex.CharGPT(ex.Config(vocab=len(tok)))
    evaluation = ex.eval_batches(ids, 4, 64, model.cfg.block, seed=args.seed)
    calib = ex.eval_batches(ids, 4, 64, model.cfg.block, seed=args.seed + 1)
    ex.train(model, ids, evaluation, steps=400, seed=args.seed, analyse=None)
    model.eval()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        hits = total = 0
        loss = 0.0
        for x, y in evaluation:
            logits = m(x)
            hits += int((logits.argmax(-1) == y).sum())
            total += y.numel()
            loss += float(ex.loss_fn(logits, y)) * y.numel()
        return {"accuracy": hits / total, "loss": loss / total}

    dense = evaluate(model)
    print(f"char-gpt: dense next-character accuracy {dense['accuracy']:.4f}", flush=True)
    diag = obd_diagonal(model, ex.loss_fn, calib, **OBD_HUTCHINSON)
    levels = (0.5,) if args.quick else (0.5, 0.7)
    return {
        "dense": dense,
        "runs": sweep(model, ex.loss_fn, calib, evaluate, levels, METHODS, diag),
    }


def timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds per layer of layer-obs and sparsegpt on an nn.Linear(d, d)."""
    rows = []
    widths = {"layer-obs": (64, 128, 256), "sparsegpt": (64, 128, 256, 512, 1024)}
    if args.quick:
        widths = {"layer-obs": (64, 128), "sparsegpt": (64, 128, 256)}
    for method, ds in widths.items():
        for d in ds:
            g = torch.Generator().manual_seed(d)
            X = torch.randn(4 * d, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
            data = (X, torch.zeros(4 * d, d))
            seconds = []
            for _ in range(args.rounds):
                layer = nn.Linear(d, d)
                r = prune(layer, nn.MSELoss(), data, method=method, sparsity=0.5)
                seconds.append(r.layers[""].seconds)
            rows.append({"method": method, "width": d, "seconds": statistics.median(seconds)})
            print(f"  {method:>9} d={d:>5}: {rows[-1]['seconds']:.3f} s per layer", flush=True)
    return rows


def targets(models: dict[str, Any]) -> dict[str, Any]:
    """At 70 %: layer-obs within 5 points of dense; above magnitude where it loses > 5."""
    out = {}
    for name in ("mlp-digits", "cnn-digits"):
        if name not in models:
            continue
        d = models[name]
        at = {r["method"]: r["accuracy"] for r in d["runs"] if r["level"] == 0.7}
        dense = d["dense"]["accuracy"]
        out[name] = {
            "dense": dense,
            "layer_obs_at_70": at["layer-obs"],
            "magnitude_at_70": at["magnitude"],
            "layer_obs_within_5_points": dense - at["layer-obs"] <= 0.05,
            "layer_obs_above_magnitude": at["layer-obs"] > at["magnitude"],
            # test accuracy of layer-obs with each allocation of a layer's removals
            "allocation_layer_vs_row": {
                str(level): {
                    "layer": acc(d, "layer-obs", level),
                    "row": acc(d, "layer-obs-row", level),
                }
                for level in (0.7, 0.8, 0.9)
                if acc(d, "layer-obs-row", level) is not None
            },
        }
    return out


def acc(model: dict[str, Any], method: str, level: float) -> float | None:
    found = [r["accuracy"] for r in model["runs"] if r["method"] == method and r["level"] == level]
    return found[0] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sparsities and widths")
    parser.add_argument("--obs", action="store_true", help="add global OBS on the digits MLP")
    parser.add_argument("--no-gpt", action="store_true", help="skip the character-level GPT")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = result_path("prune_quick" if args.quick else "prune", args.out)
    meta = machine("cpu")
    print_header(meta)
    tic = time.perf_counter()
    models = {name: digits(name, args) for name in ("mlp-digits", "cnn-digits")}
    if not args.no_gpt:
        models["char-gpt"] = char_gpt(args)
    print("time per layer against width (50 % sparsity):", flush=True)
    results = {
        "meta": meta,
        "config": {
            "train_steps": TRAIN_STEPS,
            "calibration_samples": CALIBRATION,
            "damping": 0.01,
            "sequential": True,
            "blocksize": 128,
            "allocation": "layer",
            "timing_rounds": args.rounds,
            "seed": args.seed,
            "quick": args.quick,
        },
        "accuracy": models,
        "targets": targets(models),
        "timing": timing(args),
    }
    # other work on the machine shows in the timings: the load at the start and the end
    finish(meta, tic)
    write_json(out, results)
    for name, t in results["targets"].items():
        print(
            f"{name}: dense {t['dense']:.4f}, at 70 %: layer-obs {t['layer_obs_at_70']:.4f}, "
            f"magnitude {t['magnitude_at_70']:.4f}"
        )
        for level, v in t["allocation_layer_vs_row"].items():
            print(f"  layer-obs at {level}: by layer {v['layer']:.4f}, by row {v['row']:.4f}")


if __name__ == "__main__":
    main()
