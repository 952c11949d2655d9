"""The ``hesse`` command (layer 8: argument parsing, progress, tables and files; the
mathematics is the library's).

Commands: ``demo``, ``problems``, ``compare``, ``spectrum``, ``convexity`` and ``prune``;
``hesse COMMAND --help`` says more. Needs the ``cli`` extra: ``pip install 'hesse[cli]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from hesse.cli._common import INSTALL, Output, UserError, common_options


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one sentence that says where the help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``hesse`` command."""
    from hesse import __version__
    from hesse.cli._analysis import add_convexity, add_spectrum
    from hesse.cli._compare import add_compare
    from hesse.cli._demo import add_demo
    from hesse.cli._prune import add_prune

    parser = _Parser(
        prog="hesse",
        description="The Hessian in machine learning: a demo on bundled data, the "
        "comparison of optimisers, the spectrum and the convexity of any model, and its "
        "Hessian-based pruning.",
        epilog="Run `hesse COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hesse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parent = common_options()
    add_demo(sub, parent)
    p = sub.add_parser(
        "problems",
        parents=[parent],
        help="list the built-in problems and their sizes",
        description="The built-in problems: models on data that ships with scikit-learn, "
        "and the classic test functions.",
    )
    p.set_defaults(run=run_problems)
    add_compare(sub, parent)
    add_spectrum(sub, parent)
    add_convexity(sub, parent)
    add_prune(sub, parent)
    return parser


def run_problems(args: argparse.Namespace, ui: Output) -> dict[str, Any]:
    """``hesse problems``."""
    from hesse.cli._common import parse_device, parse_dtype
    from hesse.problems import FUNCTIONS, PROBLEMS, problem

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    data = []
    for name in PROBLEMS:
        p = problem(name, dtype, device)
        data.append(
            {
                "name": name,
                "description": p.description,
                "task": p.task,
                "convex": p.convex,
                "train_samples": p.train[0].shape[0],
                "test_samples": p.test[0].shape[0],
                "input_shape": list(p.train[0].shape[1:]),
                "parameters": p.num_parameters,
                "l2": p.l2,
            }
        )
    functions = [
        {"name": f.name, "n": f.n, "f_star": f.f_star, "reference": f.reference}
        for f in FUNCTIONS.values()
    ]
    ui.table(
        "Models on data that ships with scikit-learn",
        ["name", "params", "train/test", "convex", "what"],
        [
            [
                d["name"],
                d["parameters"],
                f"{d['train_samples']}/{d['test_samples']}",
                d["convex"],
                d["description"],
            ]
            for d in data
        ],
    )
    ui.table(
        "Classic test functions (hesse compare / spectrum / convexity take them too)",
        ["name", "n", "f*", "reference"],
        [[f["name"], f["n"], f["f_star"], f["reference"]] for f in functions],
    )
    results = {"command": "problems", "problems": data, "functions": functions}
    ui.write_json("problems.json", results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hesse`` command; the exit status (0 on success, 2 for a usage error, 1
    for a failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help and --version
            return done.code if isinstance(done.code, int) else 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        ui = Output(args)
        # In --json mode stdout carries the JSON document only: whatever else prints while
        # the command runs (a user's file, a library) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if ui.json else contextlib.nullcontext():
            results = args.run(args, ui)
        ui.emit(results)
        return 0
    except KeyboardInterrupt:
        print("hesse: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every error is one sentence; the traceback with --debug
        if debug:
            traceback.print_exc()
        code = err.exit_code if isinstance(err, UserError) else 1
        message = str(err) if isinstance(err, UserError) else _failure(err)
        print(f"hesse: error: {message}", file=sys.stderr)
        return code


def _failure(err: Exception) -> str:
    if isinstance(err, ImportError):
        return f"{err} ({INSTALL})" if "pip install" not in str(err) else str(err)
    text = str(err) or type(err).__name__
    return f"{text} (run with --debug for the traceback)"


__all__ = ["build_parser", "main"]
