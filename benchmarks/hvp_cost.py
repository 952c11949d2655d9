"""Cost of a Hessian-vector product, as a multiple of the cost of one gradient.

For two small networks (an MLP 64-256-256-10 with tanh on a batch of 1024, and a two-layer
ReLU CNN on a batch of 256 MNIST-shaped images; float32, cross-entropy), this times one
product of each method below and divides it by the time of one gradient (forward and
backward of the mean loss with ``torch.autograd.grad``) measured in the same round:

* hesse: ``HessianOperator @ v`` at a new point (reverse-over-reverse and
  forward-over-reverse), ``H.linearize() @ v`` (many products at one point), the same for
  ``GGNOperator``, and the cost of ``linearize()`` itself;
* plain double backward at a new point, and reusing one cached gradient graph;
* the peers, where installed (``make bench-deps``): PyHessian (cached graph; its
  construction is a separate row), curvlinops, hessian-eigenthings and BackPACK (Hessian
  and GGN products, forward pass included).

Operators (hesse, curvlinops, eigenthings) are constructed once, outside the timed loop:
their construction is lazy (about 0.1 ms for hesse, no forward pass). Work done once per
point (``linearize()``, PyHessian's constructor) is timed as its own "setup" row.

Every product is first checked against a float64 double-backward reference (relative error
below 1e-4), so that no wrong product is timed. Timing is interleaved: after warm-up, each
round runs every method once, in a rotating order, and the table reports the median time
and the median over rounds of the ratio to that round's gradient. Peak memory is the extra
memory of the call, as a ratio to the gradient's: on CUDA from the allocator's peak, on CPU
from the growth of the peak RSS of a fresh subprocess per method (coarse).

Run (from the repository root, after ``make bench-deps``)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hvp_cost.py            # full, a few minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hvp_cost.py --quick    # a short check
    .venv/bin/python benchmarks/hvp_cost.py --device cuda   # the default where CUDA is there

On CUDA, TF32 is switched off so that float32 means float32.

The figures go to ``benchmarks/results/hvp_cost_<device>.json`` (``_quick`` appended for
``--quick``). ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hesse

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-4
PEERS = ("pyhessian", "curvlinops-for-pytorch", "hessian-eigenthings", "backpack-for-pytorch")
CPU_MEMORY_NOTE = (
    "CPU memory is RSS-based and coarse: the growth of the peak resident set size of a fresh "
    "process per method over 3 calls after its set-up and one warm-up call (peak reset through "
    "/proc/self/clear_refs on Linux, else ru_maxrss); it counts whole pages."
)

# The backward with create_graph=True inside PyHessian warns about a reference cycle.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


# -- problems ------------------------------------------------------------------------------


@dataclass
class Problem:
    """A model, its loss, one batch and a direction ``v`` (flat and split like the params)."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    params: list[Tensor]
    v: Tensor
    v_list: list[Tensor]


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """The network, the shape of one input and the batch size."""
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
        return model, (64,), 1024
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 6 * 6, 10),
        )
        return model, (1, 28, 28), 256
    raise ValueError(f"unknown model {name!r}")


def make_problem(name: str, device: torch.device, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    model, shape, n = make_model(name)
    model = model.to(device)
    X = torch.randn(n, *shape, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), device=device)
    v_list = list(hesse.ParamSpace(params).unflatten(v))
    return Problem(name, model, nn.CrossEntropyLoss(), X, y, params, v, v_list)


def flat(out: Any) -> Tensor:
    """A product's result as one flat tensor (it may come as a list of tensors)."""
    if isinstance(out, Tensor):
        return out.reshape(-1)
    return torch.cat([t.reshape(-1) for t in out])


# -- references (float64 double backward) --------------------------------------------------


def references(pb: Problem) -> dict[str, Tensor]:
    """H v and G v in float64 by plain double backward on a copy of the model."""
    model = copy.deepcopy(pb.model).double()
    ps = list(model.parameters())
    X, v = pb.X.double(), [t.double() for t in pb.v_list]
    out = model(X)
    g = torch.autograd.grad(pb.loss_fn(out, pb.y), ps, create_graph=True)
    hv = torch.autograd.grad(g, ps, grad_outputs=v, retain_graph=True)
    # G v = J^T H_out J v; J v by the double-vjp trick (the vjp is linear in u).
    u = torch.zeros_like(out, requires_grad=True)
    jtu = torch.autograd.grad(out, ps, grad_outputs=u, create_graph=True)
    jv = torch.autograd.grad(jtu, u, grad_outputs=v)[0]
    o = out.detach().requires_grad_(True)
    go = torch.autograd.grad(pb.loss_fn(o, pb.y), o, create_graph=True)[0]
    hjv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
    gv = torch.autograd.grad(out, ps, grad_outputs=hjv)
    return {"H": flat(hv), "GGN": flat(gv)}


def rel_error(out: Any, ref: Tensor) -> float:
    return float((flat(out).detach().double() - ref).norm() / ref.norm())


# -- methods: each factory does the set-up and returns the call to time -------------------

Call = Callable[[], Any]


def gradient(pb: Problem) -> Call:
    return lambda: torch.autograd.grad(pb.loss_fn(pb.model(pb.X), pb.y), pb.params)


def hesse_hvp(mode: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        H = hesse.HessianOperator(pb.model, pb.loss_fn, (pb.X, pb.y), mode=mode)
        return lambda: H @ pb.v

    return factory


def hesse_operator(pb: Problem, kind: str) -> hesse.CurvatureOperator:
    op = hesse.HessianOperator if kind == "H" else hesse.GGNOperator
    return op(pb.model, pb.loss_fn, (pb.X, pb.y))


def hesse_ggn(pb: Problem) -> Call:
    G = hesse_operator(pb, "GGN")
    return lambda: G @ pb.v


def hesse_linearized(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = hesse_operator(pb, kind).linearize()
        return lambda: op @ pb.v

    return factory


def hesse_linearize_cost(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        op = hesse_operator(pb, kind)
        return op.linearize

    return factory


def plain_hvp(pb: Problem) -> Call:
    def call() -> Any:
        loss = pb.loss_fn(pb.model(pb.X), pb.y)
        g = torch.autograd.grad(loss, pb.params, create_graph=True)
        return torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list)

    return call


def plain_hvp_cached(pb: Problem) -> Call:
    loss = pb.loss_fn(pb.model(pb.X), pb.y)
    g = torch.autograd.grad(loss, pb.params, create_graph=True)
    return lambda: torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list, retain_graph=True)


def pyhessian_construct(pb: Problem) -> Any:
    from pyhessian import hessian as PyHessian

    pb.model.zero_grad(set_to_none=True)  # its backward adds into .grad
    return PyHessian(pb.model, pb.loss_fn, data=(pb.X, pb.y), cuda=pb.X.is_cuda)


def pyhessian_hvp(pb: Problem) -> Call:
    from pyhessian.utils import hessian_vector_product

    hc = pyhessian_construct(pb)
    return lambda: hessian_vector_product(hc.gradsH, hc.params, pb.v_list)


def pyhessian_construction(pb: Problem) -> Call:
    return lambda: pyhessian_construct(pb)


def curvlinops_op(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        cls = HessianLinearOperator if kind == "H" else GGNLinearOperator
        op = cls(
            pb.model,
            pb.loss_fn,
            pb.params,
            [(pb.X, pb.y)],
            check_deterministic=False,
            num_data=pb.X.shape[0],
        )
        return lambda: op @ pb.v

    return factory


def eigenthings_op(kind: str) -> Callable[[Problem], Call]:
    def factory(pb: Problem) -> Call:
        import hessian_eigenthings as he

        data = [(pb.X, pb.y)]
        if kind == "H":
            op = he.HessianOperator(pb.model, data, he.supervised_loss(pb.loss_fn))
        else:
            op = he.GGNOperator(
                pb.model, data, he.supervised_forward, he.supervised_loss_of_output(pb.loss_fn)
            )
        return lambda: op.matvec(pb.v)

    return factory


def backpack_hvp(pb: Problem) -> Call:
    from backpack.hessianfree.hvp import hessian_vector_product

    def call() -> Any:
        loss = pb.loss_fn(pb.model(pb.X), pb.y)
        return hessian_vector_product(loss, pb.params, pb.v_list)

    return call


def backpack_ggnvp(pb: Problem) -> Call:
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    def call() -> Any:
        out = pb.model(pb.X)
        return ggn_vector_product_from_plist(pb.loss_fn(out, pb.y), out, pb.params, pb.v_list)

    return call


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "grad", "H", "GGN" (checked against the reference) or "setup"
    factory: Callable[[Problem], Call]
    package: str | None = None  # the peer's distribution, if any


RoR, FoR = "reverse-over-reverse", "forward-over-reverse"
PYH, CURV, EIG, BP = PEERS
METHODS = [
    Method("gradient", "gradient (forward + backward)", "grad", gradient),
    Method("hesse-ror", "hesse H @ v, rev-over-rev", "H", hesse_hvp(RoR)),
    Method("hesse-for", "hesse H @ v, fwd-over-rev", "H", hesse_hvp(FoR)),
    Method("hesse-lin", "hesse H.linearize() @ v", "H", hesse_linearized("H")),
    Method("plain", "double backward", "H", plain_hvp),
    Method("plain-cached", "double backward, cached grad graph", "H", plain_hvp_cached),
    Method("pyhessian", "PyHessian hvp, cached grad graph", "H", pyhessian_hvp, PYH),
    Method("curvlinops-h", "curvlinops Hessian @ v", "H", curvlinops_op("H"), CURV),
    Method("eigenthings-h", "eigenthings Hessian matvec", "H", eigenthings_op("H"), EIG),
    Method("backpack-h", "BackPACK hvp", "H", backpack_hvp, BP),
    Method("hesse-ggn", "hesse G @ v", "GGN", hesse_ggn),
    Method("hesse-ggn-lin", "hesse G.linearize() @ v", "GGN", hesse_linearized("GGN")),
    Method("curvlinops-ggn", "curvlinops GGN @ v", "GGN", curvlinops_op("GGN"), CURV),
    Method("eigenthings-ggn", "eigenthings GGN matvec", "GGN", eigenthings_op("GGN"), EIG),
    Method("backpack-ggn", "BackPACK ggnvp", "GGN", backpack_ggnvp, BP),
    Method("hesse-lin-cost", "hesse H.linearize() itself", "setup", hesse_linearize_cost("H")),
    Method(
        "hesse-ggn-lin-cost", "hesse G.linearize() itself", "setup", hesse_linearize_cost("GGN")
    ),
    Method("pyhessian-ctor", "PyHessian construction", "setup", pyhessian_construction, PYH),
]
BY_KEY = {m.key: m for m in METHODS}


# -- set-up and correctness -----------------------------------------------------------------


def check_method(m: Method, pb: Problem, refs: dict[str, Tensor]) -> tuple[Call | None, dict]:
    """Set one method up and check its first product. Returns the call to time (None if it
    is missing, fails or is wrong) and its row of results; warnings go into the note (a
    fallback to another algorithm, say)."""
    row = {"key": m.key, "label": m.label, "kind": m.kind, "package": m.package}
    row.update(status="ok", note="", rel_error=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = m.factory(pb)
            out = call()
        except ImportError as e:
            return None, {**row, "status": "skipped", "note": f"not installed ({e.name or e})"}
        except Exception as e:  # a peer's API may have moved: report, do not crash
            return None, {**row, "status": "failed", "note": f"{type(e).__name__}: {e}"[:200]}
    messages = dict.fromkeys(
        str(w.message).splitlines()[0]
        for w in caught
        if m.package is None and not issubclass(w.category, DeprecationWarning)
    )
    row["note"] = "; ".join(f"warned: {text}" for text in messages)[:300]
    if m.kind in refs:
        row["rel_error"] = err = rel_error(out, refs[m.kind])
        if not err < TOLERANCE:  # also catches nan
            return None, {**row, "status": "wrong", "note": f"rel. error {err:.1e} > {TOLERANCE:g}"}
    return call, row


def prepare(pb: Problem, refs: dict[str, Tensor]) -> tuple[dict[str, Call], dict[str, dict]]:
    """Set up and check every method: the calls to time, and a row of results per method."""
    calls: dict[str, Call] = {}
    rows: dict[str, dict] = {}
    for m in METHODS:
        call, rows[m.key] = check_method(m, pb, refs)
        if call is not None:
            calls[m.key] = call
    return calls, rows


# -- timing -----------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def time_one(call: Call, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    out = call()
    sync()
    elapsed = time.perf_counter() - start
    del out  # freed outside the timed region
    return elapsed


def time_calls(calls: dict[str, Call], rounds: int, warmup: int, device: torch.device) -> dict:
    """Seconds per call. Each round runs every method once, in a new random order (seeded):
    slow drifts of a shared machine hit all methods alike, and no method always runs right
    after the same other one (the second of two similar calls reuses the memory the first
    freed and runs faster: with a fixed rotation that alone moved a ratio by ~8%)."""
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


# -- memory -------------------------------------------------------------------------------


def cuda_extra_peak(call: Call) -> int:
    """Bytes allocated at the peak of 3 calls, beyond what was allocated before them."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        out = call()
        del out
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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


def memory_worker(key: str, model: str, device: torch.device) -> int:
    """In a fresh process: set one method up and call it once (one-time buffers, lazy
    imports), then print the growth of the peak RSS over 3 more calls as JSON."""
    pb = make_problem(model, device)
    call = BY_KEY[key].factory(pb)
    call()  # the result is dropped at once
    pb.model.zero_grad(set_to_none=True)  # the graph PyHessian's construction left in .grad
    gc.collect()
    growth = rss_peak_meter()
    for _ in range(3):
        out = call()
        del out
    print(json.dumps({"bytes": growth()}))
    return 0


def cpu_extra_peak(key: str, model: str, threads: int) -> int | None:
    cmd = [
        sys.executable,
        __file__,
        "--memory-worker",
        key,
        "--models",
        model,
        "--device",
        "cpu",
        "--threads",
        str(threads),
    ]
    # Large blocks straight from mmap, so that freed memory leaves the RSS at once and the
    # set-up's transient peaks do not hide the call's.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    try:
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["bytes"])
    except (IndexError, ValueError, KeyError):
        print(f"  memory worker {key} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None


def measure_memory(
    calls: dict[str, Call], model: str, device: torch.device, threads: int
) -> dict[str, int | None]:
    if device.type == "cuda":
        return {k: cuda_extra_peak(call) for k, call in calls.items()}
    return {k: cpu_extra_peak(k, model, threads) for k in calls}


# -- summary and report ---------------------------------------------------------------------


def summarise(
    rows: dict[str, dict], times: dict[str, list[float]], memory: dict[str, int | None]
) -> None:
    """Add medians and ratios to the gradient (per round for time) to the rows, in place."""
    grad_t, grad_m = times["gradient"], memory.get("gradient")
    for key, ts in times.items():
        ratios = [t / g for t, g in zip(ts, grad_t)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        mem = memory.get(key)
        rows[key].update(
            median_ms=1e3 * statistics.median(ts),
            ratio=statistics.median(ratios),
            ratio_quartiles=[q1, q3],
            times_ms=[round(1e3 * t, 4) for t in ts],
            memory_bytes=mem,
            memory_ratio=mem / grad_m if mem is not None and grad_m else None,
        )


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(title: str, rows: dict[str, dict]) -> None:
    head = (
        f"{'method':<36} {'ms':>8} {'x grad':>6} {'[quartiles]':>12} {'MiB':>7} "
        f"{'mem x grad':>10} {'rel.err':>8}"
    )
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for row in rows.values():
        if row["status"] != "ok":
            print(f"{row['label']:<36} {row['status'].upper()}: {row['note']}")
            continue
        mem = row["memory_bytes"]
        q1, q3 = row["ratio_quartiles"]
        print(
            f"{row['label']:<36} {row['median_ms']:8.2f} {row['ratio']:6.2f} "
            f"{f'[{q1:.2f}-{q3:.2f}]':>12} {fmt(None if mem is None else mem / 2**20, '7.1f')} "
            f"{fmt(row['memory_ratio'], '10.2f')} {fmt(row['rel_error'], '8.1e')}"
        )
    for row in rows.values():
        if row["status"] == "ok" and row["note"]:
            print(f"  note, {row['label']}: {row['note']}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    """When and where a benchmark ran: date, versions, processor, threads, device (shared
    by the benchmarks that import this module)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hesse": hesse.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def metadata(device: torch.device, args: argparse.Namespace) -> dict:
    return {
        **machine(device),
        "peers": {dist: version(dist) for dist in PEERS},
        "dtype": "float32 (TF32 off)",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "tolerance": TOLERANCE,
        "memory": "CUDA allocator peak" if device.type == "cuda" else CPU_MEMORY_NOTE,
    }


# -- driver ---------------------------------------------------------------------------------


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    pb = make_problem(name, device)
    calls, rows = prepare(pb, references(pb))
    if "gradient" not in calls:
        raise RuntimeError(f"{name}: the gradient itself failed: {rows['gradient']['note']}")
    times = time_calls(calls, args.rounds, args.warmup, device)
    memory = {} if args.no_memory else measure_memory(calls, name, device, args.threads)
    summarise(rows, times, memory)
    title = (
        f"{name}: P = {pb.v.numel()}, batch {pb.X.shape[0]}, {device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print_table(title, rows)
    return {"params": pb.v.numel(), "batch": pb.X.shape[0], "rows": list(rows.values())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method (default 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    p.add_argument("--memory-worker", choices=sorted(BY_KEY), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    if args.out is None:
        suffix = "_quick" if args.quick else ""
        args.out = RESULTS / f"hvp_cost_{torch.device(args.device).type}{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # True float32 on GPUs: TF32 convolutions (cuDNN's default) alone give relative errors
    # above 1e-4 on the CNN, for every method, plain double backward included.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.models[0], device)
    meta = metadata(device, args)
    print(
        f"torch {meta['torch']}, {meta['cpu']}, {meta['gpu'] or 'no GPU'}, "
        f"{meta['threads']} threads; peers: {meta['peers']}"
    )
    models = {name: run_model(name, device, args) for name in args.models}
    notes = [
        "ratios are medians over rounds of (method time / gradient time of that round)",
        "setup rows are one-off costs, not products",
    ]
    if device.type == "cpu" and not args.no_memory:
        notes.append(CPU_MEMORY_NOTE)
        print(f"\n{CPU_MEMORY_NOTE}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "notes": notes, "models": models}, indent=1))
    print(f"\nwrote {args.out}")
    bad = [
        r["key"] for m in models.values() for r in m["rows"] if r["status"] in ("wrong", "failed")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
