"""The character-level GPT example (``examples/char_gpt_spectrum.py``) at a tiny size,
against an independent reference: the dense float64 Hessian of the same loss, computed with
``torch.func.hessian`` under the math attention kernel (hesse picks that kernel itself; the
example never does)."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_gpt_spectrum.py"


def load_example():
    spec = importlib.util.spec_from_file_location("char_gpt_spectrum", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def dense_hessian(model, loss_fn, data) -> torch.Tensor:
    """The Hessian of the mean loss over ``data`` (equal-sized batches) with respect to the
    flat vector of the parameters, tied ones once, in float64."""
    model = copy.deepcopy(model).double()
    names, params = zip(*model.named_parameters())  # a tied weight appears once
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split(sizes)
        values = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        # tie_weights (the default) makes head.weight follow tok_emb.weight.
        return sum(loss_fn(functional_call(model, values, (x,)), y) for x, y in data) / len(data)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    with sdpa_kernel(SDPBackend.MATH):
        # Forward over torch.func.grad, not torch.func.hessian (jacfwd over jacrev): in
        # torch 2.13 the latter, and jacrev over jacrev, get the derivative of layer_norm's
        # weight gradient with respect to its input wrong (an asymmetric "Hessian").
        H = torch.func.jacfwd(torch.func.grad(loss))(theta)
        # Cross-check: a few products by plain autograd double backward.
        x = theta.clone().requires_grad_()
        g = torch.autograd.grad(loss(x), x, create_graph=True)[0]
        V = torch.randn(
            theta.numel(), 3, dtype=theta.dtype, generator=torch.Generator().manual_seed(1)
        )
        HV = torch.stack([torch.autograd.grad(g, x, v, retain_graph=True)[0] for v in V.T], 1)
    torch.testing.assert_close(H @ V, HV, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-10)
    return H


@pytest.mark.slow
def test_char_gpt_spectrum_against_dense_hessian():
    ex = load_example()
    assert "sdpa_kernel" not in inspect.getsource(ex)  # hesse handles the attention kernel

    torch.manual_seed(0)
    text = ex.load_text(("colorsys",))[:3000]
    tok = ex.Tokenizer(text)
    ids = tok.encode(text)
    cfg = ex.Config(vocab=len(tok), block=8, n_embd=8, n_head=2, n_layer=2)
    model = ex.CharGPT(cfg)
    assert model.head.weight is model.tok_emb.weight
    data = ex.eval_batches(ids, num=2, batch=4, block=cfg.block, seed=0)

    losses, results = ex.train(
        model,
        ids,
        data,
        steps=30,
        batch=8,
        lr=1e-2,
        seed=0,
        checkpoints=(30,),
        analyse=lambda m, d, step, seed: ex.curvature(
            m, d, step, seed=seed, trace_matvecs=60, probes=2, lanczos_steps=20
        ),
    )
    assert len(losses) == 30 and len(results) == 1
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1  # training did something

    r = results[0]
    P = ex.num_params(model)
    H = dense_hessian(model, ex.loss_fn, data)
    assert H.shape == (P, P)
    lam = torch.linalg.eigvalsh(H)

    # Top eigenvalues: within the certified residual (plus float32 rounding of the products).
    top, res = r.top.eigenvalues.double(), r.top.residuals.double()
    slack = 1e-4 * float(lam.abs().max())
    for i in range(3):
        assert abs(float(top[i] - lam[-1 - i])) <= float(res[i]) + slack, (top, lam[-3:])
    assert abs(float(top[0] / lam[-1]) - 1) < 1e-3
    # The bottom eigenvalue: an eigenvalue lies within its residual, and it is not below
    # the true minimum by more than that (a Ritz value is inside the spectrum).
    bottom, bres = float(r.bottom.eigenvalues[0]), float(r.bottom.residuals[0])
    assert bottom >= float(lam[0]) - slack
    assert float((lam - bottom).abs().min()) <= bres + slack

    # Trace: within three of the estimator's standard errors of the dense trace.
    exact = float(lam.sum())
    assert r.trace.stderr > 0 and math.isfinite(r.trace.estimate)
    assert abs(r.trace.estimate - exact) <= 3 * r.trace.stderr + slack, (r.trace, exact)

    # The density is a density over the spectrum's range.
    grid, dens = r.density.grid.double(), r.density.density.double()
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)
    assert float(grid[0]) <= float(lam[0]) + bres and float(grid[-1]) >= float(lam[-1]) - slack
