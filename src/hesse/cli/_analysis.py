"""``hesse spectrum`` and ``hesse convexity``: the library's analysis of one target."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import hesse
from hesse.cli._common import Output, Timer, UserError, integer, positive
from hesse.cli._targets import USER_FILE_HELP, Target, resolve
from hesse.linalg import ConvergenceWarning, DensityResult
from hesse.linalg._trace import MIN_MATVECS

TARGET_HELP = f"a built-in problem or classic function (see `hesse problems`), or {USER_FILE_HELP}"


def add_target_options(p: argparse.ArgumentParser) -> None:
    """TARGET and the options of where and how to look at its Hessian."""
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument(
        "--at",
        choices=("init", "optimum"),
        help="the point of a built-in target: its initialisation or standard start, or the "
        "optimum found by hesse.minimize (default: optimum for convex problems, else init)",
    )
    p.add_argument("--tol", type=positive, default=1e-3, help="Lanczos' relative residual (1e-3)")
    p.add_argument(
        "--max-iter",
        type=integer(),
        metavar="N",
        help="most Lanczos steps (default max(60, 4k + 40) for the spectrum, "
        "200 for convexity, 60 per layer; at most P)",
    )
    p.add_argument(
        "--probes",
        type=integer(),
        default=10,
        metavar="N",
        help="random probes of the spectral density (10)",
    )
    p.add_argument(
        "--steps", type=integer(), default=80, metavar="N", help="Lanczos steps per probe (80)"
    )
    p.add_argument("--no-density", action="store_true", help="skip the spectral density")
    p.add_argument(
        "--per-layer", action="store_true", help="also analyse each layer's block of the Hessian"
    )


def add_spectrum(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "spectrum",
        parents=[parent],
        help="eigenvalues, trace and spectral density of a Hessian",
        description="The extreme eigenvalues (Lanczos, with certified residuals), the trace "
        "(a stochastic estimate with its standard error) and the spectral density (stochastic "
        "Lanczos quadrature) of the Hessian of TARGET.",
    )
    add_target_options(p)
    p.add_argument("-k", type=integer(), default=5, metavar="K", help="number of eigenvalues (5)")
    p.add_argument(
        "--which",
        choices=("largest", "smallest", "both"),
        default="largest",
        help="which end of the spectrum (largest); both gives k of each",
    )
    p.add_argument(
        "--estimator",
        choices=("xtrace", "hutch++", "hutchinson"),
        default="xtrace",
        help="the trace estimator (xtrace)",
    )
    p.add_argument(
        "--matvecs",
        type=integer(),
        default=100,
        metavar="N",
        help="Hessian-vector products for the trace (100)",
    )
    p.set_defaults(run=run_spectrum)


def add_convexity(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convexity",
        parents=[parent],
        help="is the Hessian positive definite, and how much negative curvature is there",
        description="The definiteness of the Hessian of TARGET from its extreme eigenvalues "
        "(dense up to 500 unknowns, Lanczos beyond), whether the evidence certifies it, and the "
        "share of eigenvalues below zero estimated from the spectral density.",
    )
    add_target_options(p)
    p.set_defaults(run=run_convexity)


def _check(args: argparse.Namespace) -> None:
    for name in ("k", "matvecs", "probes", "steps", "max_iter"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not args.tol > 0:
        raise UserError(f"--tol must be positive, got {args.tol}")
    estimator = getattr(args, "estimator", None)
    if estimator is not None and args.matvecs < MIN_MATVECS[estimator]:
        raise UserError(
            f"--matvecs must be at least {MIN_MATVECS[estimator]} for --estimator "
            f"{estimator}, got {args.matvecs}"
        )


def density_summary(density: DensityResult) -> dict[str, Any]:
    """What a spectral density says in numbers."""
    return {
        "num_probes": density.nodes.shape[0],
        "steps": density.nodes.shape[1],
        "matvecs": density.matvecs,
        "sigma": density.sigma,
        "min_node": float(density.nodes.min()),
        "max_node": float(density.nodes.max()),
        "negative_eigenvalue_share": density.negative_eigenvalue_share(),
        "negative_curvature_share": density.negative_curvature_share(),
        "status": density.status,
    }


def density_data(density: DensityResult) -> dict[str, Any]:
    """The curve of a density (for figures and their JSON)."""
    return {"eigenvalue": density.grid, "density": density.density}


def compute_density(op: Any, args: argparse.Namespace, ui: Output) -> DensityResult:
    with ui.progress(f"spectral density ({args.probes} probes x {args.steps} steps)"):
        return hesse.spectral_density(op, num_probes=args.probes, steps=args.steps, seed=args.seed)


def layers(
    target: Target, blocks: dict[str, list[str]], args: argparse.Namespace, ui: Output
) -> list[dict[str, Any]]:
    """The per-layer report as rows of dicts (and a table on the terminal)."""
    with ui.progress(f"per-layer analysis ({len(blocks)} blocks)"):
        report = hesse.layer_report(
            target.model,
            target.loss_fn,
            target.data,
            io=target.io,
            blocks=blocks,
            tol=args.tol,
            max_iter=args.max_iter or 60,
            trace_matvecs=getattr(args, "matvecs", 60),
            seed=args.seed,
        )
    rows = report.as_dicts()
    modules = dict(target.model.named_modules())
    ui.table(
        "Per layer: each layer's diagonal block of the Hessian",
        ["block", "size", "λ_max", "λ_min", "trace", "verdict"],
        [
            [
                f"{r['name']} ({type(modules.get(r['name'], target.model)).__name__})",
                r["size"],
                r["top_eigenvalue"],
                r["min_eigenvalue"],
                r["trace"],
                r["verdict"].replace("_", " ")
                + ("" if r["converged"] else " (not certified: raise --max-iter)"),
            ]
            for r in rows
        ],
    )
    return rows


def run_spectrum(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse spectrum TARGET``."""
    _check(args)
    timer = Timer()
    target = resolve(args.target, args, ui)
    blocks = target.blocks() if args.per_layer else None
    op = target.operator().linearize()  # its graph built once for all the products below
    ui.print(f"[bold]Hessian of {target.describe()}[/bold]")
    with ui.progress(f"Lanczos: {args.which} {args.k} eigenvalue(s)"):
        eig = hesse.eigenvalues(
            op, k=args.k, which=args.which, tol=args.tol, max_iter=args.max_iter, seed=args.seed
        )
    with ui.progress(f"trace ({args.estimator}, {args.matvecs} products)"):
        tr = hesse.trace(op, method=args.estimator, num_matvecs=args.matvecs, seed=args.seed)
    k = eig.eigenvalues.numel()
    ends = (
        [args.which] * k
        if args.which != "both"
        else ["smallest"] * (k // 2) + ["largest"] * (k // 2)
    )
    ranks = list(range(1, k + 1)) if args.which != "both" else [*range(1, k // 2 + 1)] * 2
    ui.table(
        f"Eigenvalues ({eig.matvecs} Hessian-vector products, {eig.status})",
        ["end", "rank", "eigenvalue", "residual (certificate)", "converged"],
        [
            [e, i, float(v), float(r), bool(c)]
            for e, i, v, r, c in zip(ends, ranks, eig.eigenvalues, eig.residuals, eig.converged)
        ],
    )
    if not eig.success:
        ui.print(
            f"Lanczos stopped after {eig.matvecs} products with {int(eig.converged.sum())} of "
            f"{k} eigenvalues converged to --tol {args.tol:g}: raise --max-iter or --tol"
        )
    ui.print(f"trace ≈ {tr.estimate:.6g} ± {tr.stderr:.2g} ({tr.method}, {tr.matvecs} products)")
    results: dict[str, Any] = {
        "command": "spectrum",
        **_header(target, args),
        "eigenvalues": {
            "which": args.which,
            "values": eig.eigenvalues,
            "residuals": eig.residuals,
            "converged": eig.converged,
            "matvecs": eig.matvecs,
            "status": eig.status,
        },
        "trace": {
            "method": tr.method,
            "estimate": tr.estimate,
            "stderr": tr.stderr,
            "matvecs": tr.matvecs,
            "status": tr.status,
        },
    }
    if not args.no_density:
        density = compute_density(op, args, ui)
        results["density"] = density_summary(density)
        _print_density(results["density"], ui)
        _density_files(density, target, ui)
    if args.per_layer:
        results["layers"] = layers(target, blocks, args, ui)
    results["time_s"] = timer.seconds
    ui.write_json("spectrum.json", results)
    return results


def run_convexity(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse convexity TARGET``."""
    _check(args)
    timer = Timer()
    target = resolve(args.target, args, ui)
    blocks = target.blocks() if args.per_layer else None
    op = target.operator().linearize()  # its graph built once for all the products below
    ui.print(f"[bold]Hessian of {target.describe()}[/bold]")
    with ui.progress("extreme eigenvalues"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 'certified' says it
        if target.fun is not None:
            rep = hesse.convexity(
                target.fun, target.x, lanczos_tol=args.tol, max_iter=args.max_iter, seed=args.seed
            )
        else:
            rep = hesse.convexity(op, lanczos_tol=args.tol, max_iter=args.max_iter, seed=args.seed)
    results: dict[str, Any] = {
        "command": "convexity",
        **_header(target, args),
        "verdict": rep.verdict,
        "certified": rep.certified,
        "min_eigenvalue": rep.min_eigenvalue,
        "max_eigenvalue": rep.max_eigenvalue,
        "zero_tol": rep.tol,
        "exact": rep.exact,
        "matvecs": rep.matvecs,
        "gradient_norm": rep.gradient_norm,
        "is_saddle": rep.is_saddle,
    }
    rows = [
        ["verdict", str(rep.verdict).replace("_", " ")],
        ["certified by the evidence", rep.certified],
        ["smallest eigenvalue", rep.min_eigenvalue],
        ["largest eigenvalue", rep.max_eigenvalue],
        ["|λ| counted as zero below", rep.tol],
        ["how", "dense eigh" if rep.exact else f"Lanczos, {rep.matvecs} products"],
    ]
    if rep.gradient_norm is not None:
        rows += [["gradient norm", rep.gradient_norm], ["saddle point", rep.is_saddle]]
    if not args.no_density:
        density = compute_density(op, args, ui)
        results["density"] = density_summary(density)
        d = results["density"]
        results["negative_eigenvalue_share"] = d["negative_eigenvalue_share"]
        results["negative_curvature_share"] = d["negative_curvature_share"]
        rows += [
            ["share of eigenvalues < −σ (density)", d["negative_eigenvalue_share"]],
            ["share of curvature Σ|λ| that is negative", d["negative_curvature_share"]],
        ]
        _density_files(density, target, ui)
    ui.table("Convexity", ["", "value"], rows)
    if args.per_layer:
        results["layers"] = layers(target, blocks, args, ui)
    results["time_s"] = timer.seconds
    ui.write_json("convexity.json", results)
    return results


def _header(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "target": target.name,
        "kind": target.kind,
        "point": target.point,
        "parameters": target.size,
        "dtype": str(target.dtype).split(".")[-1],
        "device": args.device,
        "seed": args.seed,
        "hesse_version": hesse.__version__,
    }


def _print_density(summary: dict[str, Any], ui: Output) -> None:
    ui.print(
        f"spectral density: Ritz values in [{summary['min_node']:.4g}, {summary['max_node']:.4g}]"
        f" ({summary['matvecs']} products); below −σ = {-summary['sigma']:.2g} (its "
        f"resolution): {summary['negative_eigenvalue_share']:.3g} of the eigenvalues, "
        f"{summary['negative_curvature_share']:.3g} of the curvature Σ|λ|"
    )


def _density_files(density: DensityResult, target: Target, ui: Output) -> None:
    path = ui.path("density.png")
    if path is None:
        return
    from hesse.cli import _figures

    _figures.densities({target.describe(): density}, path, "Spectral density of the Hessian")
    ui.write_json("density.json", {target.describe(): density_data(density)})
