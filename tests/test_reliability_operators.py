"""A curvature that is finite where the loss is not: refused, not analysed (issue 14)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import hesse


def _nan_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randn(8, 2)
    y[0, 0] = float("nan")  # the squared error's Hessian and GGN do not depend on y
    return model, nn.MSELoss(), (X, y)


def test_the_premise_the_ggn_is_finite_where_the_loss_is_not():
    """The squared error's GGN, 2/(nD) J^T J, never reads the targets: without the loss check
    a product would be finite and every analysis would go on."""
    model, loss_fn, (X, y) = _nan_targets()
    assert torch.isnan(loss_fn(model(X), y))
    J = torch.func.jacrev(lambda w: torch.func.functional_call(model, w, (X,)))(
        dict(model.named_parameters())
    )
    J = torch.cat([j.reshape(y.numel(), -1) for j in J.values()], 1)
    assert torch.isfinite(2.0 / y.numel() * J.T @ J).all()


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher-mc", "hessian-fwd"])
def test_a_nan_loss_is_an_error_in_products_and_analysis(kind):
    model, loss_fn, data = _nan_targets()
    make = {
        "hessian": lambda: hesse.HessianOperator(model, loss_fn, data),
        "ggn": lambda: hesse.GGNOperator(model, loss_fn, data),
        "fisher-mc": lambda: hesse.FisherOperator(model, loss_fn, data, kind="mc"),
        "hessian-fwd": lambda: hesse.HessianOperator(
            model, loss_fn, data, mode="forward-over-reverse"
        ),
    }[kind]
    H = make()
    v = torch.ones(H.shape[0])
    with pytest.warns(UserWarning) if kind == "hessian-fwd" else contextlib.nullcontext():
        for op in (H, H.damped(0.1), 2.0 * H, H + H):
            with pytest.raises(hesse.NonFiniteError, match="the loss at the current parameters"):
                op @ v
    with pytest.raises(hesse.NonFiniteError, match="NaN or infinity in the parameters"):
        H.linearize()
    with pytest.raises(hesse.NonFiniteError):
        hesse.convexity(H, seed=0)
    with pytest.raises(hesse.NonFiniteError):
        hesse.eigenvalues(H, k=1, seed=0)


def test_a_finite_loss_still_works_and_the_check_keeps_nothing():
    model, loss_fn, (X, y) = _nan_targets()
    y = torch.nan_to_num(y)
    H = hesse.GGNOperator(model, loss_fn, (X, y))
    v = torch.ones(H.shape[0])
    for _ in range(3):
        H @ v
    assert H._losses == []  # checked and released with each product


def test_a_reassigned_parameter_outside_the_block_is_followed():
    """The operator reads the model's other parameters at each product: one the user
    replaces (model surgery) is used, as a fresh operator would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = (torch.randn(8, 3), torch.randn(8, 2))
    H = hesse.HessianOperator(model, nn.MSELoss(), data, params=["2.weight", "2.bias"])
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    before = H @ v
    model[0].weight = nn.Parameter(torch.randn(4, 3))
    after = H @ v
    fresh = hesse.HessianOperator(model, nn.MSELoss(), data, params=["2.weight", "2.bias"])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh @ v, rtol=0, atol=0)
