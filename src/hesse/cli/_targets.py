"""What a command analyses or trains: a built-in problem, a classic test function, or a
user's Python file that defines ``model``, ``loss_fn`` and ``data``."""

from __future__ import annotations

import argparse
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hesse
from hesse.analysis import parameter_blocks
from hesse.cli._common import UserError, parse_device, parse_dtype
from hesse.func._io import map_tensors
from hesse.problems import FUNCTIONS, PROBLEMS, Problem, classic_function, load_into, problem

USER_FILE_HELP = (
    "a Python file that defines model (an nn.Module), loss_fn (outputs, targets -> scalar) "
    "and data (a batch (inputs, targets) or a dict holding 'labels', or a list or DataLoader "
    "of batches), and optionally io (a hesse.ModelIO)"
)

#: How a problem's optimum is found for ``--at optimum`` (the same run the tests repeat).
OPTIMUM_METHOD = {"problem": "newton-cg", "function": "trust-ncg"}


@dataclass
class Target:
    """One thing to analyse, at one point.

    Attributes:
        name: As given on the command line.
        kind: ``"problem"``, ``"function"`` (a classic test function) or ``"file"``.
        point: Where: ``"init"`` (a model's seeded initialisation, a function's standard
            start), ``"optimum"`` (found by :func:`hesse.minimize`) or ``"given"`` (a
            user's file: the model as the file leaves it).
        model, loss_fn, data: The model target (``None`` for a function).
        io: How its batches reach the model (:class:`hesse.ModelIO`; ``None``: defaults).
        fun, x: The objective as a function of one flat vector and the point, for convex
            problems (whose penalty a model's loss does not hold) and classic functions.
        problem: The built-in problem, if any.
    """

    name: str
    kind: str
    point: str
    model: nn.Module | None = None
    loss_fn: Callable[[Tensor, Any], Tensor] | None = None
    data: Any = None
    io: hesse.ModelIO | None = None
    fun: Callable[[Tensor], Tensor] | None = None
    x: Tensor | None = None
    problem: Problem | None = None

    @property
    def size(self) -> int:
        """Number of unknowns (the Hessian is ``size x size``)."""
        if self.x is not None:
            return self.x.numel()
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype if self.x is not None else next(self.model.parameters()).dtype

    def operator(self) -> hesse.CurvatureOperator:
        """The Hessian at the point, as a lazy operator."""
        if self.fun is not None:
            return hesse.FunctionHessian(self.fun, self.x)
        return hesse.HessianOperator(self.model, self.loss_fn, self.data, io=self.io)

    def blocks(self) -> dict[str, list[str]]:
        """The parameter blocks of ``--per-layer`` (one per module that owns parameters)."""
        if self.model is None:
            raise UserError(
                f"--per-layer needs a model with layers; {self.name} is a function of one vector"
            )
        blocks = parameter_blocks(self.model)
        if len(blocks) < 2:
            raise UserError(
                f"--per-layer needs a model with more than one layer; {self.name} has one "
                "block of parameters, so drop --per-layer"
            )
        return blocks

    def describe(self) -> str:
        """E.g. ``"mlp-digits at init (4,810 parameters, float32)"``."""
        where = {"init": "at init", "optimum": "at the optimum", "given": "as given"}[self.point]
        if self.kind == "function":
            where = {"init": "at the standard start", "optimum": "at the minimum found"}[self.point]
        return f"{self.name} {where} ({self.size:,} unknowns, {str(self.dtype).split('.')[-1]})"


def is_file(name: str) -> bool:
    """Whether TARGET names a Python file rather than a built-in problem."""
    return name.endswith(".py") or "/" in name or Path(name).is_file()


def resolve(name: str, args: argparse.Namespace, ui: Any) -> Target:
    """The target of ``hesse spectrum``/``convexity`` called ``name``, at ``args.at``."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    if is_file(name):
        if args.at is not None:
            raise UserError(
                f"--at applies to the built-in problems; {name} is your file, whose model is "
                "analysed as it is: drop --at (or load trained weights in the file)"
            )
        model, loss_fn, data, io = load_user_file(name, device, dtype, args.device != "cpu")
        return Target(name, "file", "given", model, loss_fn, data, io)
    if name in PROBLEMS:
        p = problem(name, dtype, device)
        torch.manual_seed(args.seed)
        model = p.make_model()
        at = args.at or ("optimum" if p.convex else "init")
        if at == "optimum" and not p.convex:
            raise UserError(
                f"--at optimum needs a convex problem and {name} is not one: use --at init, "
                "or your own file with a trained model"
            )
        target = Target(name, "problem", at, model, p.loss_fn, p.train, problem=p)
        if getattr(args, "per_layer", False):
            target.blocks()  # refuses a model of one layer before any work
        if p.convex:  # the penalty is part of the objective, not of loss_fn
            target.fun, target.x = p.objective(model)
        if at == "optimum":
            target.x = _minimum(target, ui)
            load_into(model, target.x)
        return target
    if name.replace("_", "-").lower() in FUNCTIONS:
        f = classic_function(name)
        target = Target(f.name, "function", args.at or "init", fun=f.fun)
        if getattr(args, "per_layer", False):
            target.blocks()  # refuses
        target.x = f.x0(dtype=dtype or torch.float64, device=device)
        if target.point == "optimum":
            target.x = _minimum(target, ui)
        return target
    raise UserError(
        f"{name!r} is neither a built-in problem nor a file; `hesse problems` lists the "
        "problems, or give the path of a .py file that defines model, loss_fn and data"
    )


def _minimum(target: Target, ui: Any) -> Tensor:
    method = OPTIMUM_METHOD[target.kind]
    with ui.progress(f"the optimum of {target.name}: hesse.minimize({method!r})"):
        r = hesse.minimize(target.fun, target.x, method)
    if not r.success:
        raise RuntimeError(f"finding the optimum of {target.name} failed: {r.message}")
    return r.x


def load_user_file(
    path: str, device: torch.device, dtype: torch.dtype | None, moved: bool
) -> tuple[nn.Module, Callable, Any, hesse.ModelIO | None]:
    """Run the user's file and take its ``model``, ``loss_fn``, ``data`` and, if it defines
    one, ``io``.

    Args:
        path: The file.
        device, dtype: Where to put the model and data (``dtype=None``: as they are).
        moved: Whether ``--device`` was given (the data must then be a batch of tensors).
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"no such file: {path}; give {USER_FILE_HELP}, or a built-in problem")
    try:
        namespace = runpy.run_path(str(file), run_name="__hesse__")
    except SystemExit as err:
        raise UserError(f"{path} called exit() while hesse ran it; remove that call") from err
    except Exception as err:
        raise RuntimeError(f"running {path} failed: {type(err).__name__}: {err}") from err
    missing = [k for k in ("model", "loss_fn", "data") if k not in namespace]
    if missing:
        names = " and ".join(
            [", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing
        )
        raise UserError(
            f"{path} does not define {names}; it must define {USER_FILE_HELP} "
            "(see 'The hesse command' in the README)"
        )
    model, loss_fn, data = namespace["model"], namespace["loss_fn"], namespace["data"]
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model in {path} must be a torch.nn.Module, but it is a {type(model).__name__}"
        )
    if not callable(loss_fn):
        raise UserError(f"loss_fn in {path} must be callable (outputs, targets) -> scalar")
    io = namespace.get("io")
    if io is not None and not isinstance(io, hesse.ModelIO):
        raise UserError(f"io in {path} must be a hesse.ModelIO, but it is a {type(io).__name__}")
    if dtype is not None or moved:
        if not (io or hesse.ModelIO()).is_batch(data):
            raise UserError(
                "--device and --dtype move data given as one batch ((inputs, targets) or a "
                f"dict); {path} gives a {type(data).__name__}: move it in the file instead"
            )
        model = model.to(device=device, dtype=dtype)
        data = map_tensors(data, lambda t: _move(t, device, dtype))
    return model, loss_fn, data, io


def _move(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)
