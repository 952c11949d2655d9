"""What every command shares: the user-error type, the common options, and the output
(tables and progress on the terminal, JSON on request, files under ``--out``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hesse._core._progress import Counts, listen

INSTALL = "pip install 'hesse[cli]'"


class UserError(Exception):
    """A mistake in the command line or the user's file: printed as one sentence, no
    traceback, exit status 2."""

    exit_code = 2


class MissingDependency(UserError):
    """An optional dependency of the command is not installed (exit status 1)."""

    exit_code = 1


def need(module: str) -> Any:
    """Import an optional dependency of the command, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise MissingDependency(f"the hesse command needs {top}: {INSTALL}") from err


def integer(lo: int = 1, hi: int = 2**31 - 1) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {v}")
        return v

    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number > 0 (a usage error otherwise)."""
    return _number(text, strict=True)


def nonnegative(text: str) -> float:
    """An argparse type: a finite number >= 0 (a usage error otherwise)."""
    return _number(text, strict=False)


def _number(text: str, strict: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
        bound = "> 0" if strict else ">= 0"
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
    return v


def common_options() -> argparse.ArgumentParser:
    """The options every command takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    g.add_argument("--out", metavar="DIR", type=Path, help="write figures and JSON to DIR")
    g.add_argument(
        "--seed",
        type=integer(0, 2**63 - 1),
        default=0,
        metavar="N",
        help="seed of every random draw (default 0)",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="floating dtype (default: float64 for linear problems, float32 for networks)",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def parse_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {name!r} is not a torch device; use cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``--dtype`` as a torch dtype (``None``: the problem's own)."""
    return None if name is None else getattr(torch, name)


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: tensors as lists or floats, non-finite floats as ``null``."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, str):  # enums such as Status and Verdict too
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    return str(value)


class Output:
    """Where a command's results go: tables and progress bars to the terminal, or one JSON
    document to stdout (``--json``); files to ``--out``."""

    def __init__(self, args: argparse.Namespace):
        rich_console = need("rich.console")
        self.json = bool(args.json)
        self.out: Path | None = args.out
        if self.out is not None:
            _check_writable(self.out)
        self.console = rich_console.Console(highlight=False)
        if not self.console.is_terminal:  # a file or a pipe: no screen to fit, room for tables
            self.console = rich_console.Console(highlight=False, width=120)
        self.err = rich_console.Console(stderr=True, highlight=False)
        self.written: list[Path] = []
        # progress bars only where a person watches: not in --json mode, not into a pipe
        self.quiet = self.json or not self.err.is_terminal

    # ------------------------------------------------------------------ terminal output

    def print(self, *objects: Any) -> None:
        """Print to the terminal (nothing in ``--json`` mode, whose stdout is JSON only)."""
        if not self.json:
            self.console.print(*objects)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table; numbers are right-aligned."""
        if self.json:
            return
        rich_table = need("rich.table")
        t = rich_table.Table(title=title, title_justify="left", title_style="bold")
        numeric = [
            all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(columns))
        ]
        for i, (name, num) in enumerate(zip(columns, numeric)):
            t.add_column(name, justify="right" if num else "left", no_wrap=i == 0, overflow="fold")
        for r in rows:
            t.add_row(*(fmt(v) for v in r))
        self.console.print(t)

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[Any]:
        """A progress bar (``total`` steps) or spinner on stderr, gone when done; silent in
        ``--json`` mode. Yields ``advance(n=1, description=None)``."""
        rich_progress = need("rich.progress")
        columns = [
            rich_progress.SpinnerColumn(),
            rich_progress.TextColumn("{task.description}"),
        ]
        if total is not None:
            columns += [rich_progress.BarColumn(), rich_progress.MofNCompleteColumn()]
        columns.append(rich_progress.TimeElapsedColumn())
        with rich_progress.Progress(
            *columns, console=self.err, transient=True, disable=self.quiet
        ) as bar:
            task = bar.add_task(description, total=total)
            counts = Counts()
            shown = [description]

            def advance(n: float = 1, description: str | None = None) -> None:
                if description is not None:
                    shown[0] = description
                    bar.update(task, description=description)
                bar.advance(task, n)

            def listener(event: str, n: int) -> None:  # hesse's products and batches
                counts(event, n)
                bar.update(task, description=f"{shown[0]} [dim]({counts.describe()})[/dim]")

            with listen(listener):
                yield advance

    # ------------------------------------------------------------------------- files

    def path(self, name: str) -> Path | None:
        """The path of a file to write under ``--out`` (``None`` without ``--out``)."""
        if self.out is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        p = self.out / name
        self.written.append(p)
        return p

    def write_json(self, name: str, data: Any) -> Path | None:
        """Write ``data`` as JSON under ``--out``."""
        p = self.path(name)
        if p is not None:
            p.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")
        return p

    def emit(self, results: dict[str, Any]) -> None:
        """The end of a command: in ``--json`` mode the results on stdout; the list of files
        written otherwise."""
        if self.json:
            sys.stdout.write(json.dumps(to_jsonable(results), indent=1) + "\n")
            sys.stdout.flush()
        elif self.written:
            self.console.print(f"wrote {len(self.written)} files to {self.out}/")


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` folder that cannot be written before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"--out {out}: cannot write files there ({reason})") from err


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v is None


def fmt(v: Any) -> str:
    """A table cell: numbers to 4 significant digits, ``None`` as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
