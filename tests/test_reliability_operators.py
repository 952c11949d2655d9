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


# -- a batch of another dtype, a parameter the loss does not use, a non-finite product --
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("cls", [hesse.HessianOperator, hesse.GGNOperator, hesse.FisherOperator])
def test_a_batch_of_another_dtype_than_the_model_is_one_clear_error(cls):
    model = _mlp()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(
        TypeError, match="inputs are float64 but the model's parameters are float32"
    ):
        cls(model, nn.CrossEntropyLoss(), (x, y)) @ torch.ones(26)


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    "cls",
    [hesse.HessianOperator, hesse.GGNOperator, hesse.FisherOperator, hesse.FiniteDifferenceHessian],
)
def test_a_parameter_the_loss_does_not_use_has_zero_curvature(cls):
    torch.manual_seed(0)
    model = _WithUnused().double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    loss_fn = nn.CrossEntropyLoss()
    alone = cls(model, loss_fn, batch, params=[model.unused])
    assert torch.equal(
        alone @ torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    )
    # with the used ones, the unused block is zero and the used block is the used-only one
    both = cls(model, loss_fn, batch, params=[model.unused, *model.lin.parameters()])
    used = cls(model, loss_fn, batch, params=list(model.lin.parameters()))
    v = torch.randn(3 + 8, dtype=torch.float64)
    out = both @ v
    assert torch.equal(out[:3], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out[3:], used @ v[3:], rtol=1e-6, atol=1e-9)


def test_layer_report_of_a_model_with_an_unused_parameter():
    torch.manual_seed(0)
    model = _WithUnused()
    report = hesse.layer_report(
        model, nn.CrossEntropyLoss(), (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    )
    rows = {r.name: r for r in report.rows}
    assert rows["(root)"].top_eigenvalue == 0.0 and rows["(root)"].trace == 0.0
    assert rows["lin"].top_eigenvalue > 0


def test_a_non_finite_product_of_a_finite_loss_names_the_cause():
    """sqrt(|o|) at o = 0: the loss is finite, its second derivative is not."""
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    batch = (torch.zeros(8, 3), torch.zeros(8, 2))
    H = hesse.HessianOperator(model, lambda o, t: torch.sqrt(o.abs()).sum() * 1e-3 + 1, batch)
    with pytest.raises(hesse.NonFiniteError, match="a second derivative is not"):
        H @ torch.ones(8)
    with pytest.raises(hesse.NonFiniteError, match="a second derivative is not"):
        hesse.eigenvalues(H, k=1)
