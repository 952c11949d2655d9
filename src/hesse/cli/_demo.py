"""``hesse demo``: the library on data that ships with scikit-learn, in under two minutes.

Part 1, a convex problem: logistic regression on the breast-cancer data; the Hessian at
the optimum and six minimisation methods compared. Part 2, a non-convex one: an MLP on the
digits trained with a second-order optimizer and with Adam; the Hessian's spectrum at
initialisation and after each. Everything goes through the public API; this module only
orders the calls and writes the tables, figures, ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

import hesse
from hesse.cli import _figures
from hesse.cli._analysis import density_summary
from hesse.cli._common import Output, Timer, fmt, parse_device, parse_dtype, to_jsonable
from hesse.cli._compare import (
    DEMO_MINIMIZE,
    minimize_all,
    minimize_summary,
    print_minimize,
    print_train,
    train_all,
)
from hesse.linalg import ConvergenceWarning
from hesse.problems import problem

#: What each budget spends. ``full`` is the demo; ``quick`` checks that it runs.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        "max_iter": 5000,
        "epochs": {"hessian-free": 60, "adam": 4000},
        "k": 10,
        "probes": 10,
        "steps": 80,
        "trace": 100,
        "lanczos": 400,
    },
    "quick": {
        "max_iter": 60,
        "epochs": {"hessian-free": 2, "adam": 20},
        "k": 3,
        "probes": 3,
        "steps": 15,
        "trace": 12,
        "lanczos": 60,
    },
}
CONVEX = "logistic-breast-cancer"
NETWORK = "mlp-digits"
SECOND_ORDER = "hessian-free"


def add_demo(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[parent],
        help="the tour: logistic regression and an MLP on bundled data",
        description="(1) Logistic regression on the breast-cancer data: the Hessian at the "
        "optimum and Newton, Newton-CG, BFGS, L-BFGS, gradient descent and Nesterov compared. "
        "(2) An MLP on the digits trained with Hessian-free and with Adam: the Hessian's "
        "spectrum at initialisation and after training. Writes PNG figures, their data as "
        "JSON, results.json and report.md to --out (default hesse-demo/).",
    )
    p.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        default="full",
        help="full: the demo (half a minute on 2 idle cores); quick: seconds, to check it runs",
    )
    p.set_defaults(run=run_demo, out_default=Path("hesse-demo"))


def run_demo(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse demo``."""
    timer = Timer()
    if ui.out is None:
        ui.out = args.out_default
    budget = BUDGETS[args.budget]
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    results: dict[str, Any] = {
        "command": "demo",
        "budget": args.budget,
        "seed": args.seed,
        "device": str(device),
        "hesse_version": hesse.__version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    results["logistic"] = _part_one(args, ui, budget, device, dtype)
    results["mlp"] = _part_two(args, ui, budget, device, dtype)
    results["figures"] = {
        name: {"png": name, "json": name.replace(".png", ".json"), "caption": caption}
        for name, caption in FIGURES.items()
    }
    results["time_s"] = timer.seconds
    ui.write_json("results.json", results)
    report = ui.path("report.md")
    report.write_text(_report(results))
    ui.print(f"done in {results['time_s']:.0f} s; the report is {report}")
    return results


# ------------------------------------------------------------------------------ part 1


def _part_one(args, ui: Output, budget, device, dtype) -> dict[str, Any]:
    p = problem(CONVEX, dtype, device)
    ui.print(f"\n[bold]1. {p.description}[/bold]")
    torch.manual_seed(args.seed)
    fun, w0 = p.objective(p.make_model())
    runs = minimize_all(fun, w0, list(DEMO_MINIMIZE), None, budget["max_iter"], ui, None, p.convex)
    out: dict[str, Any] = {
        "problem": CONVEX,
        "samples": p.train[0].shape[0],
        "parameters": w0.numel(),
        "l2": p.l2,
        "dtype": str(w0.dtype).split(".")[-1],
    }
    out.update(minimize_summary(runs, None))
    # the point where the Hessian is examined: the best end point of the six runs
    best = min(runs, key=lambda m: float(runs[m][0].fun))
    w = runs[best][0].x
    H = hesse.FunctionHessian(fun, w)
    with ui.progress("the Hessian at the optimum"):
        rep = hesse.convexity(fun, w, seed=args.seed)
        cond = hesse.condition_number(H, seed=args.seed)
        ends = hesse.eigenvalues(H, k=3, which="both", tol=1e-8, seed=args.seed)
        spectrum = hesse.eigenvalues(H, k=w.numel(), seed=args.seed)
    out["optimum"] = {"method": best, "fun": float(runs[best][0].fun)}
    out["hessian"] = {
        "verdict": rep.verdict,
        "certified": rep.certified,
        "exact": rep.exact,
        "min_eigenvalue": rep.min_eigenvalue,
        "max_eigenvalue": rep.max_eigenvalue,
        "gradient_norm": rep.gradient_norm,
        "condition_number": cond.value,
        "condition_status": cond.status,
        "bottom_eigenvalues": ends.eigenvalues[:3],
        "top_eigenvalues": ends.eigenvalues[3:],
        "residuals": ends.residuals,
        "eigenvalues": spectrum.eigenvalues,
    }
    hs = out["hessian"]
    ui.table(
        f"The Hessian at the optimum ({w.numel()} × {w.numel()})",
        ["", "value"],
        [
            ["verdict", f"{str(rep.verdict).replace('_', ' ')} (dense eigh: exact)"],
            ["condition number λ_max / λ_min", cond.value],
            ["top 3 eigenvalues", ", ".join(fmt(float(v)) for v in hs["top_eigenvalues"])],
            ["bottom 3 eigenvalues", ", ".join(fmt(float(v)) for v in hs["bottom_eigenvalues"])],
            ["gradient norm there", rep.gradient_norm],
        ],
    )
    print_minimize(out, ui, f"Minimising the objective from w = 0 ({CONVEX})")
    data = _figures.convergence(
        out,
        ui.path("logistic_convergence.png"),
        "Logistic regression, breast cancer: six methods from w = 0",
    )
    ui.write_json("logistic_convergence.json", data)
    data = _figures.eigenvalues(
        {"Hessian at the optimum": spectrum.eigenvalues},
        ui.path("logistic_eigenvalues.png"),
        f"Logistic regression: all {w.numel()} eigenvalues of the Hessian\n"
        f"at the optimum (condition number {cond.value:.3g})",
        "eigenvalue λᵢ",
        line=(p.l2, f"L2 penalty λ = {p.l2:g} (on the weights)"),
    )
    ui.write_json("logistic_eigenvalues.json", data)
    return out


# ------------------------------------------------------------------------------ part 2


def _part_two(args, ui: Output, budget, device, dtype) -> dict[str, Any]:
    p = problem(NETWORK, dtype, device)
    ui.print(f"\n[bold]2. {p.description}[/bold]")
    models: dict[str, Any] = {}
    train = train_all(
        p, [SECOND_ORDER, "adam"], ui, budget["epochs"], None, None, None, args.seed, models
    )
    print_train(train, ui, p)
    torch.manual_seed(args.seed)  # the initial weights that hesse.optim.compare used
    points = {"init": p.make_model(), **models}
    analysis: dict[str, Any] = {}
    densities: dict[str, Any] = {}
    tops: dict[str, Any] = {}
    with ui.progress("the Hessian at each point", total=len(points)) as advance:
        for name, model in points.items():
            advance(0, f"the Hessian at {_label(name)}")
            analysis[name], densities[_label(name)], tops[_label(name)] = _examine(
                model, p, budget, args.seed
            )
            advance(1)
    ui.table(
        f"The Hessian of the training loss ({p.num_parameters:,} parameters) at "
        "initialisation and after each optimizer",
        ["point", "λ_max", "λ_min", "trace", "verdict", "λ < 0", "curv. < 0"],
        [
            [
                n,
                float(a["top_eigenvalues"][0]),
                a["min_eigenvalue"],
                a["trace"],
                _verdict(a),
                a["negative_eigenvalue_share"],
                a["negative_curvature_share"],
            ]
            for n, a in analysis.items()
        ],
    )
    data = _figures.training(
        train,
        ui.path("mlp_training.png"),
        "MLP on the digits: full-batch training from the same initial weights ("
        + ", ".join(f"{m} {d['steps']} steps" for m, d in train["methods"].items())
        + ")",
        p.metric_name,
    )
    ui.write_json("mlp_training.json", data)
    data = _figures.densities(
        densities,
        ui.path("mlp_density.png"),
        "MLP on the digits: spectral density of the Hessian (stochastic Lanczos quadrature)",
    )
    ui.write_json("mlp_density.json", data)
    data = _figures.eigenvalues(
        tops,
        ui.path("mlp_top_eigenvalues.png"),
        f"MLP on the digits: the top {budget['k']} eigenvalues of the Hessian",
        "eigenvalue λᵢ",
        gap=(9.5, "9 = classes − 1") if budget["k"] > 9 else None,
    )
    ui.write_json("mlp_top_eigenvalues.json", data)
    return {
        "problem": NETWORK,
        "parameters": p.num_parameters,
        "samples": p.train[0].shape[0],
        "training": train,
        "hessian": analysis,
    }


def _verdict(a: dict[str, Any]) -> str:
    return str(a["verdict"]).replace("_", " ") + ("" if a["certified"] else " (not certified)")


def _label(point: str) -> str:
    return "at initialisation" if point == "init" else f"after {point}"


def _examine(model, p, budget, seed) -> tuple[dict[str, Any], Any, Any]:
    H = hesse.HessianOperator(model, p.loss_fn, p.train).linearize()
    top = hesse.eigenvalues(H, k=budget["k"], seed=seed)
    tr = hesse.trace(H, num_matvecs=budget["trace"], seed=seed)
    density = hesse.spectral_density(
        H, num_probes=budget["probes"], steps=budget["steps"], seed=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 'certified' says it
        rep = hesse.convexity(H, max_iter=budget["lanczos"], seed=seed)
    summary = density_summary(density)
    out = {
        "top_eigenvalues": top.eigenvalues,
        "top_residuals": top.residuals,
        "top_status": top.status,
        "trace": tr.estimate,
        "trace_stderr": tr.stderr,
        "verdict": rep.verdict,
        "certified": rep.certified,
        "min_eigenvalue": rep.min_eigenvalue,
        "max_eigenvalue": rep.max_eigenvalue,
        "negative_eigenvalue_share": summary["negative_eigenvalue_share"],
        "negative_curvature_share": summary["negative_curvature_share"],
        "density": summary,
    }
    return out, density, top.eigenvalues


# ------------------------------------------------------------------------------ report

FIGURES = {
    "logistic_convergence.png": "Logistic regression: the gap f(x) − f* of each method against "
    "iterations (left) and wall-clock time (right), log scales, all from w = 0. The dotted "
    "line is the rounding level of f* in float64.",
    "logistic_eigenvalues.png": "Logistic regression: every eigenvalue of the Hessian at the "
    "optimum, by rank (log scale). The dashed line is the L2 penalty λ added to the weights' "
    "curvature; the spread from top to bottom is the condition number, which sets the pace "
    "of gradient descent.",
    "mlp_training.png": "MLP: the training loss above its infimum (the entropy of the "
    "smoothed labels) and the test error against training time (the evaluation is off the "
    "clock), both optimizers full-batch from the same initial weights.",
    "mlp_density.png": "MLP: the spectral density of the Hessian of the training loss "
    "(stochastic Lanczos quadrature; log density floored at 1e-5 of its peak) at "
    "initialisation and after each optimizer. Mass left of the dotted zero line is negative "
    "curvature: the loss is not convex there.",
    "mlp_top_eigenvalues.png": "MLP: the top eigenvalues of the Hessian at each point "
    "(Lanczos, each certified by its residual). For cross-entropy over C classes, C − 1 "
    "outliers above the bulk are typical (Papyan 2019); here C = 10.",
}


def _figure(name: str) -> list[str]:
    caption = FIGURES[name].replace("*", "\\*")  # f* inside an emphasis
    return [f"![{name}]({name})", "", f"*{caption}*"]


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _report(results: dict[str, Any]) -> str:
    r = to_jsonable(results)
    lo, mlp = r["logistic"], r["mlp"]
    h = lo["hessian"]
    parts = [
        "# hesse demo",
        "",
        f"hesse {r['hesse_version']}, torch {r['torch_version']}, {r['machine']}, "
        f"budget `{r['budget']}`, seed {r['seed']}; {r['time_s']:.0f} s in all.",
        "",
        f"## 1. Logistic regression on the breast-cancer data ({lo['samples']} samples, "
        f"{lo['parameters']} parameters, L2 {lo['l2']:g})",
        "",
        f"At the optimum the Hessian is **{h['verdict'].replace('_', ' ')}** (exact: dense "
        f"eigh), with condition number **{h['condition_number']:.4g}**: top eigenvalues "
        + ", ".join(f"{v:.4g}" for v in h["top_eigenvalues"])
        + "; bottom "
        + ", ".join(f"{v:.4g}" for v in h["bottom_eigenvalues"])
        + ".",
        "",
        _md_table(
            [
                "method",
                "iterations",
                "f evals",
                "gradients",
                "Hessian-vector products",
                "dense Hessians",
                "time (s)",
                "f − f*",
                "status",
            ],
            [
                [
                    m,
                    d["nit"],
                    d["nfev"],
                    d["njev"],
                    d["nhvp"],
                    d["nhev"],
                    d["time_s"],
                    d["fun"] - lo["f_star"],
                    d["status"],
                ]
                for m, d in lo["methods"].items()
            ],
        ),
        "",
        f"f* = {lo['f_star']:.12g}, the best value found.",
        "",
        *_figure("logistic_convergence.png"),
        "",
        *_figure("logistic_eigenvalues.png"),
        "",
        f"## 2. An MLP on the digits ({mlp['samples']} samples, {mlp['parameters']:,} parameters)",
        "",
        _md_table(
            ["optimizer", "learning rate", "steps", "time (s)", "training loss", "test accuracy"],
            [
                [d["optimizer"], d["lr"], d["steps"], d["time_s"], d["loss"], d["test_metric"]]
                for d in mlp["training"]["methods"].values()
            ],
        ),
        "",
        *_figure("mlp_training.png"),
        "",
        _md_table(
            [
                "point",
                "λ_max",
                "λ_min",
                "trace",
                "verdict",
                "share of eigenvalues < 0",
                "share of curvature < 0",
            ],
            [
                [
                    _label(n),
                    a["top_eigenvalues"][0],
                    a["min_eigenvalue"],
                    a["trace"],
                    _verdict(a),
                    a["negative_eigenvalue_share"],
                    a["negative_curvature_share"],
                ]
                for n, a in mlp["hessian"].items()
            ],
        ),
        "",
        "λ_max and λ_min come from Lanczos (a negative Ritz value proves negative curvature, "
        "so an indefinite verdict is certified), the trace from XTrace, and the two shares "
        "from the spectral density's quadrature: the share of eigenvalues below minus its "
        "resolution σ (the kernel width; closer to zero the sign is not resolved), and the "
        "share of the curvature Σ|λᵢ| that lies in negative eigenvalues.",
        "",
        *_figure("mlp_density.png"),
        "",
        *_figure("mlp_top_eigenvalues.png"),
        "",
        "Every figure's data is in the JSON file of the same name; every number in `results.json`.",
        "",
    ]
    return "\n".join(parts)
