"""What every benchmark shares: timing, memory meters, the machine it ran on, tables and
result files. The method is in ``benchmarks/README.md``; this module is its code (the
memory meters are in ``_memory.py``).

* **Timing.** :func:`time_calls` times several calls side by side: after warm-up, each round
  runs every call once, in a new random order, so that a slow drift of a shared machine
  hits all of them alike; :func:`timed` times one call; :func:`rotations` gives the
  rotating order of interleaved runs that take seconds each. Every clock is
  ``time.perf_counter``, with ``torch.cuda.synchronize`` around the call on CUDA.
* **Metadata.** :func:`machine` is the common header of every result file (date, git
  commit, versions, processor, threads, device, load average at the start);
  :func:`finish` adds the load average at the end and the total time;
  :func:`print_header` prints it in one line and warns when the machine is busy.
* **Tables and files.** :func:`print_table` prints aligned columns (``-`` where there is no
  number); :func:`write_json` writes ``benchmarks/results/<name>.json`` (or ``--out``) as
  standard JSON.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import hesse

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
Call = Callable[[], Any]

# -- timing ---------------------------------------------------------------------------------


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device (kernels run asynchronously: a clock
    read without it times the launch, not the work), else a no-op."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_one(call: Call, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds of one ``call()``; its result is freed outside the timed region."""
    sync()
    start = time.perf_counter()
    out = call()
    sync()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def time_calls(
    calls: dict[str, Call], rounds: int, warmup: int, device: torch.device | str | None = None
) -> dict[str, list[float]]:
    """Seconds per call, ``rounds`` of them per key. Each round runs every call once, in a
    new random order (seeded): slow drifts of a shared machine hit all calls alike, and no
    call always runs right after the same other one (the second of two similar calls reuses
    the memory the first freed and runs faster: with a fixed rotation that alone moved a
    ratio by ~8%). ``warmup`` untimed calls each first; the garbage collector runs between
    rounds, not during them."""
    sync = synchronizer(device)
    order = random.Random(0)
    for call in calls.values():
        for _ in range(warmup):
            time_one(call, sync)
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            gc.collect()
            for k in order.sample(keys, len(keys)):
                times[k].append(time_one(calls[k], sync))
    finally:
        gc.enable()
    return times


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall-clock seconds (garbage collected before, not during)."""
    gc.collect()
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def rotations(keys: Sequence[Any], rounds: int) -> Iterator[tuple[int, list[Any]]]:
    """``(r, order)`` for each round ``r``: ``keys`` rotated by ``r``, so that each key runs
    first once in ``len(keys)`` rounds (for runs long enough that their order matters
    less than for :func:`time_calls`)."""
    keys = list(keys)
    for r in range(rounds):
        shift = r % max(len(keys), 1)
        yield r, keys[shift:] + keys[:shift]


def median(xs: Iterable[float]) -> float | None:
    """The median, or None for no values."""
    xs = list(xs)
    return statistics.median(xs) if xs else None


def quartiles(xs: Sequence[float]) -> list[float]:
    """``[q1, q3]`` (both the value itself for a single value)."""
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return [q1, q3]


# -- metadata -------------------------------------------------------------------------------


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict:
    """The commit of the working tree, and whether src/ differs from it (hesse is imported
    from the working tree)."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {
        "commit": git("rev-parse", "HEAD"),
        "src_modified": bool(status) if status is not None else None,
    }


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, where the system has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def machine(device: torch.device | str | None = None, peers: Iterable[str] = ()) -> dict:
    """When and where a benchmark ran: the common header of every result file. ``peers``:
    distributions whose versions to record (None where not installed)."""
    device = torch.device(device if device is not None else "cpu")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hesse": hesse.__version__,
        "numpy": version("numpy"),
        "peers": {dist: version(dist) for dist in peers},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **{name: os.environ.get(name) for name in THREAD_VARIABLES},
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_start": load_average(),
    }


def finish(meta: dict, start: float | None = None) -> dict:
    """Add the load average at the end (and the seconds since ``start``) to ``meta``."""
    meta["load_average_end"] = load_average()
    if start is not None:
        meta["total_seconds"] = time.perf_counter() - start
    return meta


def print_header(meta: dict, busy: float = 0.5) -> None:
    """One line on the versions, processor, threads and load; a warning when the 1-minute
    load average exceeds ``busy`` per core (other work is running: times will be noisy)."""
    peers = meta.get("peers") or {}
    load = meta.get("load_average_start")
    print(
        f"torch {meta['torch']}, hesse {meta['hesse']}, {meta['cpu']}"
        + (f", {meta['gpu']}" if meta.get("gpu") else "")
        + f", {meta['threads']} torch threads, OPENBLAS_NUM_THREADS="
        f"{meta.get('OPENBLAS_NUM_THREADS')}"
        + (f", load {load[0]:.2f}" if load else "")
        + (f"; peers: {peers}" if peers else "")
    )
    cores = meta.get("cpu_count") or 1
    if load and load[0] > busy * cores:
        print(
            f"  warning: load average {load[0]:.2f} on {cores} cores: other work is running, "
            "times will be noisy (ratios measured in one run are less affected)"
        )


# -- tables ---------------------------------------------------------------------------------


def spec_width(spec: str) -> int:
    """The width a format spec asks for (``"<24"``: 24, ``"8.3f"``: 8, ``".2e"``: 0)."""
    digits = "".join(ch for ch in spec.lstrip("<>^").split(".")[0] if ch.isdigit())
    return int(digits) if digits else 0


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or a dash as wide as the spec asks where there is no number
    (None or nan)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(max(spec_width(spec), 1))
    return format(x, spec)


def print_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]
) -> None:
    """Print ``title``, a header, a rule and one line per row. ``columns``: (heading, format
    spec) pairs such as ``("method", "<24")`` or ``("seconds", "8.3f")``; a cell that is
    None or nan prints as a dash, a string in a numeric column is right-aligned."""
    widths = [max(len(head), spec_width(spec)) for head, spec in columns]

    def cell(x: Any, spec: str, width: int) -> str:
        left = spec.startswith("<")
        if isinstance(x, str) and not (left or spec.startswith(">") or spec.startswith("^")):
            text = x  # a string where numbers are: right-aligned
        else:
            text = fmt(x, spec)
        return text.ljust(width) if left else text.rjust(width)

    head = " ".join(
        h.ljust(w) if s.startswith("<") else h.rjust(w) for (h, s), w in zip(columns, widths)
    )
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for row in rows:
        print(" ".join(cell(x, s, w) for x, (_, s), w in zip(row, columns, widths)).rstrip())


# -- result files ---------------------------------------------------------------------------


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float as a string ("inf", "nan"), so that the file is
    standard JSON (``float()`` reads the strings back)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def result_path(name: str, out: Path | None = None) -> Path:
    """``out`` if given, else ``benchmarks/results/<name>`` (``.json`` added if missing)."""
    if out is not None:
        return Path(out)
    return RESULTS / (name if name.endswith(".json") else f"{name}.json")


def write_json(path: Path, data: dict, compact: bool = False) -> Path:
    """Write ``data`` (its ``"meta"`` the header of :func:`machine`) as standard JSON:
    indented, or on one line with ``compact`` (large files); prints where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compact:
        text = json.dumps(finite_json(data), separators=(",", ":"), default=float)
    else:
        text = json.dumps(finite_json(data), indent=1, default=float) + "\n"
    path.write_text(text)
    print(f"wrote {path}")
    return path
