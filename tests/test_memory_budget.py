"""Linearised operators within a memory budget: the same numbers whatever is cached, and
memory that does not grow with the data when little may be cached (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from hesse.operators._memory import parse_budget, resolve_budget


def _problem(n=96, batch=16, shuffle=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=shuffle)
    return model, nn.CrossEntropyLoss(), loader


@pytest.mark.parametrize("cls", [hesse.HessianOperator, hesse.GGNOperator])
def test_products_are_the_same_whatever_is_cached(cls):
    model, loss_fn, loader = _problem()
    H = cls(model, loss_fn, loader)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2))
    ref = H @ V  # no cache at all
    full = H.linearize(memory_budget="1G")
    assert full.cached_batches == 6 and not full.recomputed
    per_batch = full.cached_bytes / 6
    # A partial cache leaves room for the graph of the batch being recomputed: 3.5 graphs'
    # worth caches 2 (2 + 1 <= 3.5), 2.5 caches 1, and 1.5 graphs' worth caches none.
    for budget, cached in [
        (0, 0),
        (int(1.5 * per_batch), 0),
        (int(2.5 * per_batch), 1),
        (int(3.5 * per_batch), 2),
        ("1G", 6),
    ]:
        L = H.linearize(memory_budget=budget)
        assert L.cached_batches == cached and L.recomputed == (cached < 6)
        if 0 < cached < 6:
            assert L.cached_bytes + per_batch <= parse_budget(budget)
        assert L.cached_bytes <= parse_budget(budget)
        torch.testing.assert_close(L @ V, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(L @ V, ref, rtol=1e-6, atol=1e-7)  # again: reusable


def test_analysis_is_the_same_whatever_is_cached(monkeypatch):
    model, loss_fn, loader = _problem()
    results = []
    for budget in ("0", "1G"):
        monkeypatch.setenv("HESSE_MEMORY_BUDGET", budget)
        H = hesse.HessianOperator(model, loss_fn, loader)
        eig = hesse.eigenvalues(H, k=2, seed=0, max_iter=40)
        tr = hesse.trace(H, method="hutch++", num_matvecs=12, seed=0)
        results.append((eig.eigenvalues, tr.estimate))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    # the operator's own budget wins over the environment
    monkeypatch.setenv("HESSE_MEMORY_BUDGET", "0")
    H = hesse.HessianOperator(model, loss_fn, loader, memory_budget="1G")
    assert H.linearize().cached_batches == 6


def test_a_shuffled_loader_is_refused_only_when_partly_cached():
    model, loss_fn, loader = _problem(shuffle=True)
    H = hesse.HessianOperator(model, loss_fn, loader)
    H.linearize(memory_budget="1G")  # all cached: the order does not matter
    with pytest.raises(ValueError, match="shuffle=False"):
        H.linearize(memory_budget=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("512", 512), ("256M", 256 * 2**20), ("1.5G", int(1.5 * 2**30)), ("2k", 2048),
     ("64MiB", 64 * 2**20), (1e6, 10**6)],
)  # fmt: skip
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["-1", "1X", "", "nan", -5, float("inf"), True, [1]])
def test_bad_budgets_are_clear_errors(bad, monkeypatch):
    with pytest.raises((ValueError, TypeError), match="memory_budget|HESSE_MEMORY_BUDGET"):
        parse_budget(bad)
    if isinstance(bad, str) and bad:  # an empty variable counts as unset
        monkeypatch.setenv("HESSE_MEMORY_BUDGET", bad)
        with pytest.raises(ValueError, match="HESSE_MEMORY_BUDGET"):
            resolve_budget(None, torch.device("cpu"))


def test_the_default_is_a_share_of_free_memory(monkeypatch):
    monkeypatch.delenv("HESSE_MEMORY_BUDGET", raising=False)
    budget = resolve_budget(None, torch.device("cpu"))
    assert 0 < budget < 2**50


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    import hesse
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3,
        padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    batches = [(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))) for _ in range(24)]
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), batches)
    v = torch.randn(H.shape[0])
    H @ v  # warm up: one batch's graph at a time

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field + ":"))

    # the peak resident set (VmHWM) reset now: a forked child inherits its parent's peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    L = H.linearize(memory_budget=sys.argv[1])
    L @ v
    print(json.dumps({"growth": status("VmHWM") - before, "cached": L.cached_bytes,
                      "batches": L.cached_batches}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_stays_within_the_budget_plus_one_graph(tmp_path):
    """Coarse, on CPU (peak resident set size of a fresh process): with a budget of three
    and a half batches' graphs, memory stays near it; with room for all, it grows with the
    data."""
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)

    def run(budget: str) -> dict:
        out = subprocess.run([sys.executable, str(script), budget], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    everything = run("100G")
    assert everything["batches"] == 24
    one = everything["cached"] / 24  # one batch's graph, as measured by hesse
    assert everything["growth"] > 12 * one, everything  # the premise: caching costs memory
    two = run(str(int(3.5 * one)))  # two cached graphs and room for a recomputed one
    assert two["batches"] == 2, two
    assert two["growth"] < 3.5 * one + 2 * one, (two, one)  # the budget, plus slack


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budgets_give_the_same_products(monkeypatch):
    monkeypatch.delenv("HESSE_MEMORY_BUDGET", raising=False)
    model, loss_fn, loader = _problem()
    model = model.cuda()
    batches = [(X.cuda(), y.cuda()) for X, y in loader]
    H = hesse.HessianOperator(model, loss_fn, batches)
    V = torch.randn(H.shape[0], 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = H @ V
    full = H.linearize()  # the default: half of the GPU's free memory, plenty here
    assert full.cached_batches == 6 and 0 < full.memory_budget < torch.cuda.mem_get_info()[1]
    part = H.linearize(memory_budget=int(3.5 * full.cached_bytes / 6))
    assert part.cached_batches == 2 and part.recomputed
    for L in (full, part):
        torch.testing.assert_close(L @ V, ref, rtol=1e-5, atol=1e-6)
