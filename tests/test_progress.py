"""Progress of long work: off by default, counts what was done when asked, never in --json."""

from __future__ import annotations

import io
import json

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
