"""Hessian-vector products through a Hugging Face transformer: hesse against a hand-written
double backward, and what the math attention kernel costs in memory.

The model is a tiny GPT-2 from ``transformers`` (``n_embd=64, n_layer=2, n_head=4,
vocab_size=256``, no dropout, eval mode, the default ``attn_implementation="sdpa"``;
P = 124,672 parameters for 128 positions), the loss the mean next-token cross-entropy of a
batch of 8 random sequences, float32. The batch reaches hesse as a Hugging Face dict
(``{"input_ids": ..., "labels": ...}``) and the model returns a ``ModelOutput``; hesse passes
its ``logits`` to the loss.

By default ``scaled_dot_product_attention`` picks a fused kernel (flash on CPU, memory-
efficient for float32 on CUDA) whose backward has no derivative: a plain double backward
fails. hesse runs its own forward passes under the
math kernel (:func:`hesse.func.second_order`); the hand-written reference does it by hand
(``with sdpa_kernel(SDPBackend.MATH)``).

(a) Time, at sequence length 64 (``--time-seq``), interleaved in one run (each round runs
every method once, in a new random order, after warm-up), median over rounds:

* ``hesse H @ v`` with a new ``HessianOperator`` product at each call (forward, backward
  with its graph, one backward through it) against the same written by hand (``loss`` ->
  ``torch.autograd.grad(create_graph=True)`` -> ``torch.autograd.grad(g, params, v)``);
* ``H.linearize() @ v`` (graph built once) against a hand-written backward through one
  cached gradient graph;
* a first-order pass (forward and backward, default kernel) as the unit.

Each hesse product is first checked against a float64 double-backward product (relative
error below 1e-4). The ratios hesse / hand-written are medians of per-round ratios; the
target is at most 1.05.

(b) Extra peak memory of one call over what is allocated before it, per sequence length
(``--seqs``, default 64 128 256; ``n_positions`` is raised to the longest): a first-order
pass with the default (fused) kernel, a first-order pass with the math kernel, and a
Hessian-vector product (hesse's and hand-written) with the math kernel. The math kernel
stores the attention matrix, ``batch * heads * T^2`` per layer, so its extra memory grows
quadratically with ``T`` while the fused kernels' grows linearly. On CUDA the figure is the
allocator's peak (``torch.cuda.max_memory_allocated``); on CPU it is the growth of the peak
resident set size of a fresh process per measurement over 3 calls after one warm-up call
(coarse: whole pages, and the allocator's caching).

Run (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/transformer_hvp.py           # ~2 min
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/transformer_hvp.py --quick   # a check
    .venv/bin/python benchmarks/transformer_hvp.py --device cuda   # the default with CUDA

The figures go to ``benchmarks/results/transformer_hvp.json`` (``transformer_hvp_cuda``
on CUDA, ``_quick`` appended for ``--quick``). ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from _harness import (
    RESULTS,
    Call,
    finish,
    machine,
    print_header,
    print_table,
    quartiles,
    time_calls,
    version,
    write_json,
)
from _memory import cpu_memory_note, cuda_extra_peak, fresh_process_peak, print_worker_peak
from _models import rel_error
from _transformer_hvp_methods import (
    BATCH,
    BY_KEY,
    MEMORY_KEYS,
    METHODS,
    PAIRS,
    Problem,
    make_problem,
    reference,
)

TOLERANCE = 1e-4
TARGET = 1.05
CPU_MEMORY_NOTE = cpu_memory_note("measurement")


# -- (a) time -----------------------------------------------------------------------------------


def default_kernel_double_backward(pb: Problem) -> str:
    """Whether a plain double backward works with the default attention kernel."""
    try:
        g = torch.autograd.grad(pb.loss(), pb.params, create_graph=True)
        torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list)
    except RuntimeError as err:
        return f"fails: {str(err).splitlines()[0][:160]}"
    return "works"


def run_time(args: argparse.Namespace, device: torch.device) -> dict:
    pb = make_problem(args.time_seq, device)
    ref = reference(pb)
    plain_default = default_kernel_double_backward(pb)
    print(f"double backward with the default attention kernel: {plain_default}")
    rows: dict[str, dict] = {}
    calls: dict[str, Call] = {}
    for m in METHODS:
        call = m.factory(pb)
        out = call()
        row = {"key": m.key, "label": m.label, "rel_error": None}
        if m.hvp:
            row["rel_error"] = err = rel_error(out, ref)
            if not err < TOLERANCE:
                raise RuntimeError(f"{m.label}: relative error {err:.1e} > {TOLERANCE:g}")
        rows[m.key], calls[m.key] = row, call
    times = time_calls(calls, args.rounds, args.warmup, device)
    for key, ts in times.items():
        row = rows[key]
        row["median_ms"] = 1e3 * statistics.median(ts)
        row["x_first_order"] = statistics.median(t / g for t, g in zip(ts, times["grad"]))
        row["times_ms"] = [round(1e3 * t, 4) for t in ts]
        if key in PAIRS:
            ratios = [t / p for t, p in zip(ts, times[PAIRS[key]])]
            q = quartiles(ratios)
            row.update(vs=PAIRS[key], ratio=statistics.median(ratios), ratio_quartiles=q)
    return {
        "seq": args.time_seq,
        "batch": BATCH,
        "params": pb.v.numel(),
        "default_kernel_double_backward": plain_default,
        "rows": rows,
    }


def print_time(res: dict, args: argparse.Namespace, device: torch.device) -> None:
    columns = [
        ("method", "<40"),
        ("ms", "8.2f"),
        ("x 1st", "6.2f"),
        ("hesse / by hand [quartiles]", ">28"),
        ("rel.err", "8.1e"),
    ]
    rows = []
    for row in res["rows"].values():
        ratio = ""
        if "ratio" in row:
            q1, q3 = row["ratio_quartiles"]
            ratio = f"{row['ratio']:.3f} [{q1:.2f}-{q3:.2f}]"
        rows.append([row["label"], row["median_ms"], row["x_first_order"], ratio, row["rel_error"]])
    title = (
        f"(a) time: P = {res['params']}, batch {res['batch']} x {res['seq']} tokens, {device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print_table(title, columns, rows)


# -- (b) memory ---------------------------------------------------------------------------------


def memory_worker(key: str, seq: int) -> int:
    """In a fresh process (CPU): set one method up, call it once, then print the growth of
    the peak RSS over 3 more calls as JSON."""
    call = BY_KEY[key].factory(make_problem(seq, torch.device("cpu")))
    call()
    return print_worker_peak(call)


def run_memory(args: argparse.Namespace, device: torch.device) -> list[dict]:
    out = []
    for seq in args.seqs:
        if device.type == "cuda":
            pb = make_problem(seq, device)
            mem = {k: cuda_extra_peak(BY_KEY[k].factory(pb)) for k in MEMORY_KEYS}
            del pb
        else:
            mem = {
                k: fresh_process_peak(__file__, k, ["--seqs", str(seq)], args.threads)
                for k in MEMORY_KEYS
            }
        # The math kernel's attention probabilities: batch * heads * T^2 floats per layer.
        attn = BATCH * 4 * seq * seq * 4 * 2
        out.append({"seq": seq, "bytes": mem, "attention_matrices_bytes": attn})
    return out


def print_memory(res: list[dict], device: torch.device) -> None:
    def ratio(a: int | None, b: int | None) -> float | None:
        return None if a is None or not b else a / b

    def mib(b: int | None) -> float | None:
        return None if b is None else b / 2**20

    columns = [
        ("T", "5d"),
        ("1st, dflt", "11.1f"),
        ("1st, math", "10.1f"),
        ("hesse Hv", "9.1f"),
        ("by hand Hv", "11.1f"),
        ("Hv/1st dflt", "13.2f"),
        ("1st math/dflt", "15.2f"),
        ("B*h*T^2*L fp32", "15.1f"),
    ]
    rows = []
    for r in res:
        m = r["bytes"]
        rows.append(
            [
                r["seq"],
                mib(m["grad"]),
                mib(m["grad-math"]),
                mib(m["hesse"]),
                mib(m["plain"]),
                ratio(m["hesse"], m["grad"]),
                ratio(m["grad-math"], m["grad"]),
                mib(r["attention_matrices_bytes"]),
            ]
        )
    print_table(f"(b) extra peak memory, MiB ({device}; batch {BATCH})", columns, rows)


# -- driver ---------------------------------------------------------------------------------


def metadata(device: torch.device, args: argparse.Namespace) -> dict:
    return {
        **machine(device, ("transformers",)),
        "transformers": version("transformers"),
        "dtype": "float32 (TF32 off)",
        "model": "GPT2LMHeadModel(n_embd=64, n_layer=2, n_head=4, vocab_size=256), sdpa",
        "batch": BATCH,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "tolerance": TOLERANCE,
        "memory": "CUDA allocator peak" if device.type == "cuda" else CPU_MEMORY_NOTE,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--time-seq", type=int, default=64, help="sequence length timed (64)")
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256], help="memory sweep")
    p.add_argument("--rounds", type=int, default=51, help="timed rounds (default 51)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method (default 3)")
    p.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up, T = 64 and 128")
    p.add_argument("--no-memory", action="store_true", help="skip the memory sweep")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    p.add_argument("--memory-worker", choices=MEMORY_KEYS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.seqs = 5, 1, [64, 128]
    if args.out is None:
        dev = "" if torch.device(args.device).type == "cpu" else "_cuda"
        args.out = RESULTS / f"transformer_hvp{dev}{'_quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.seqs[0])
    meta = metadata(device, args)
    print_header(meta)
    timing = run_time(args, device)
    print_time(timing, args, device)
    memory = [] if args.no_memory else run_memory(args, device)
    if memory:
        print_memory(memory, device)
    notes = [
        "ratio: median over rounds of (hesse time / hand-written time in that round)",
        "x 1st: median over rounds of (time / first-order time, default kernel, that round)",
        "memory: extra peak over the allocations before the call; the last column is the "
        "math kernel's attention probabilities, batch * heads * T^2 * layers float32",
    ]
    if device.type == "cpu" and memory:
        notes.append(CPU_MEMORY_NOTE)
        print(f"\n{CPU_MEMORY_NOTE}")
    worst = max(r["ratio"] for r in timing["rows"].values() if "ratio" in r)
    print(f"hesse / hand-written, worst of the two medians: {worst:.3f} (target <= {TARGET})")
    finish(meta)
    write_json(args.out, {"meta": meta, "notes": notes, "time": timing, "memory": memory})
    return 0


if __name__ == "__main__":
    sys.exit(main())
