"""Progress of long work: off by default, counts what was done when asked, never in --json."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import hesse


def _operator(batches=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    data = [(torch.randn(6, 3), torch.randn(6, 1)) for _ in range(batches)]
    return hesse.HessianOperator(model, nn.MSELoss(), data)


def test_silent_unless_asked(capsys):
    H = _operator()
    hesse.eigenvalues(H, k=1, seed=0, max_iter=5)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_counts_products_batches_and_the_time_left_in_a_pass():
    H = _operator(batches=5)
    stream = io.StringIO()
    with hesse.progress(stream, every=0.0) as counts:
        H @ torch.ones(H.shape[0], 3)  # one product of 3 columns: one pass over 5 batches
        L = H.linearize(memory_budget=0)  # caches nothing: no batch computed
        L @ torch.ones(H.shape[0])  # recomputes all 5 batches
    assert counts.products == 3 + 1
    assert counts.batches == 5 + 5
    text = stream.getvalue()
    assert "4 products, 10 batches" in text and text.endswith("\n")
    assert "pass 2/5" in text and "s left in it" in text  # mid-pass lines say what is left
    # nothing is listened to after the context
    before = counts.products
    H @ torch.ones(H.shape[0])
    assert counts.products == before


@pytest.mark.parametrize(
    ("analysis", "budget"),
    [
        (lambda H: hesse.trace(H, num_matvecs=12, seed=0), 12),
        (lambda H: hesse.diagonal(H, "xdiag", num_matvecs=8, seed=0), 8),
        (lambda H: hesse.spectral_density(H, num_probes=2, steps=5, seed=0), 10),
        (lambda H: hesse.eigenvalues(H, k=1, max_iter=7, tol=1e-12, seed=0), 7),
    ],
    ids=["trace", "diagonal", "density", "eigenvalues"],
)
def test_an_analysis_announces_its_budget_and_the_time_left(analysis, budget):
    H = _operator(batches=2)
    stream = io.StringIO()
    with hesse.progress(stream, every=0.0) as counts:
        analysis(H)
    assert counts.budget == budget
    assert 0 < counts.products <= budget
    lines = stream.getvalue().split("\r")
    # mid-way (these analyses make several products), the lines say at most how long is
    # left; the last one does not
    assert any("at most ~" in line for line in lines[:-1])
    assert "at most" not in lines[-1]


def test_a_new_analysis_replaces_the_unspent_budget():
    counts = hesse._core._progress.Counts()
    counts("budget", 100)
    counts("product", 30)  # converged early
    counts("budget", 10)
    assert counts.budget == 40


def test_the_cli_json_has_no_progress(capsys, tmp_path):
    from hesse.cli import main

    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))\n"
        "loss_fn = nn.MSELoss()\ndata = [(torch.randn(6, 3), torch.randn(6, 1))] * 4\n"
    )
    assert main(["spectrum", str(path), "-k", "1", "--no-density", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "products" not in out + err
