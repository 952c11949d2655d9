"""Memory meters, shared by ``hvp_cost.py``, ``transformer_hvp.py`` and ``memory_budget.py``.

* :func:`peak_meter` starts a meter of the growth of the peak from now on: the allocator's
  peak on CUDA, the peak resident set size on the CPU (:func:`rss_peak_meter`);
  :func:`extra_peak` is the growth over a few calls (:func:`cuda_extra_peak` on CUDA).
* On the CPU a call's peak is only seen clearly in a fresh process: :func:`run_worker` runs
  one and reads the JSON it prints; :func:`fresh_process_peak` runs a script's
  ``--memory-worker`` (large blocks straight from ``mmap``) and :func:`print_worker_peak`
  is that worker's side. :func:`cpu_memory_note` says how coarse that figure is.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from _harness import Call


def cpu_memory_note(per: str) -> str:
    """What the CPU figures of a fresh process ``per`` method or measurement mean."""
    return (
        "CPU memory is RSS-based and coarse: the growth of the peak resident set size of a fresh "
        f"process per {per} over 3 calls after its set-up and one warm-up call (peak reset "
        "through /proc/self/clear_refs on Linux, else ru_maxrss); it counts whole pages."
    )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"no {field} in /proc/self/status")


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def rss_peak_meter() -> Callable[[], int]:
    """A function returning the growth of the peak RSS from now on. On Linux the peak
    (VmHWM) is reset here, so that the peaks of imports and set-up do not hide the call's;
    elsewhere it falls back to ru_maxrss, which cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        return lambda: _status_bytes("VmHWM") - before
    except OSError:
        before = _max_rss_bytes()
        return lambda: _max_rss_bytes() - before


def peak_meter(device: torch.device | str) -> Callable[[], int]:
    """A function returning the growth of the peak from now on: beyond what the allocator
    holds now on CUDA (its peak reset here), of the resident set size on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - base
    return rss_peak_meter()


def extra_peak(call: Call, device: torch.device | str, calls: int = 3) -> int:
    """Bytes at the peak of ``calls`` calls, beyond what was there before them (garbage
    collected first; each result freed before the next call)."""
    gc.collect()
    growth = peak_meter(device)
    for _ in range(calls):
        out = call()
        del out
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return growth()


def cuda_extra_peak(call: Call) -> int:
    """Bytes allocated at the peak of 3 calls, beyond what was allocated before them."""
    return extra_peak(call, "cuda")


def malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc), so that a baseline resident size
    holds no free memory that the measured call would reuse unseen."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_worker(cmd: list[str], env: dict[str, str], what: str) -> Any:
    """Run ``cmd`` (a fresh Python process) and return the JSON on the last line of its
    output, or None (and print why on stderr) if it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"  {what} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None


def fresh_process_peak(script: str, key: str, options: list[str], threads: int) -> int | None:
    """``script --memory-worker key *options`` on the CPU in a fresh process: the bytes its
    :func:`print_worker_peak` reports, or None if it failed."""
    cmd = [sys.executable, script, "--memory-worker", key, *options]
    cmd += ["--device", "cpu", "--threads", str(threads)]
    # Large blocks straight from mmap, so that freed memory leaves the RSS at once and the
    # set-up's transient peaks do not hide the call's.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    out = run_worker(cmd, env, f"memory worker {key}")
    return None if out is None else int(out["bytes"])


def print_worker_peak(call: Call) -> int:
    """The worker's side of :func:`fresh_process_peak`, after the call's set-up and one
    warm-up call: print the growth of the peak RSS over 3 more calls as JSON."""
    print(json.dumps({"bytes": extra_peak(call, "cpu")}))
    return 0
