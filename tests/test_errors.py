"""Bad input gets a clear error naming what was expected and what came."""

import pytest
import torch
from torch import nn

from conftest import make_data, mlp
from hesse import FisherOperator, GGNOperator, HessianOperator, NonFiniteError


@pytest.fixture
def setup():
    model = mlp()
    X, y = make_data("ce")
    return model, nn.CrossEntropyLoss(), (X, y)


def test_operand_errors(setup):
    H = HessianOperator(*setup)
    P = H.shape[0]
    with pytest.raises(ValueError, match=rf"shape \({P},\) or \({P}, k\), got shape \(3,\)"):
        H @ torch.zeros(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float64, got torch.float32"):
        H @ torch.zeros(P)
    with pytest.raises(NonFiniteError, match="1 NaN"):
        v = torch.zeros(P, dtype=torch.float64)
        v[3] = float("nan")
        H @ v
    with pytest.raises(TypeError, match="torch.Tensor"):
        H @ [0.0] * P


def test_loss_must_be_scalar(setup):
    model, _, data = setup
    with pytest.raises(ValueError, match=r"reduction 'mean' or 'sum'\), got 'none'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    H = HessianOperator(model, lambda out, y: (out - 1.0).pow(2).sum(1), data)
    with pytest.raises(ValueError, match=r"scalar.*got shape \(12,\)"):
        H @ torch.zeros(H.shape[0], dtype=torch.float64)


def test_data_errors(setup):
    model, loss_fn, data = setup
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(model, loss_fn, [])
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(model, loss_fn, iter([data]))
    with pytest.raises(TypeError, match="one batch .* or an iterable"):
        HessianOperator(model, loss_fn, 3.0)
    H = HessianOperator(model, loss_fn, [(data[0],)])
    with pytest.raises(TypeError, match="pair \\(inputs, targets\\).*got a tuple of length 1"):
        H @ torch.zeros(H.shape[0], dtype=torch.float64)

    class Empty:
        def __iter__(self):
            return iter(())

    H = HessianOperator(model, loss_fn, Empty())
    with pytest.raises(ValueError, match="data is empty"):
        H @ torch.zeros(H.shape[0], dtype=torch.float64)


def test_parameter_errors(setup):
    model, loss_fn, data = setup
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        HessianOperator(frozen, loss_fn, data)
    with pytest.raises(ValueError, match="params names 'nope', but the model has no parameter"):
        HessianOperator(model, loss_fn, data, params=["nope"])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, loss_fn, data, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator(model, loss_fn, data, params=[])
    with pytest.raises(ValueError, match="twice"):
        HessianOperator(model, loss_fn, data, params=["0.weight", model[0].weight])
    model.register_parameter(
        "steps", nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    )
    with pytest.raises(TypeError, match="'steps' must be floating point.*torch.int64"):
        HessianOperator(model, loss_fn, data, params=["steps"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HessianOperator(lambda x: x, loss_fn, data)


def test_random_forward_passes_are_refused(setup):
    _, loss_fn, data = setup
    dropout = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"random: dropout module\(s\) \['1'\] .*model.eval"):
        HessianOperator(dropout, loss_fn, data)
    HessianOperator(dropout.eval(), loss_fn, data)  # eval mode is deterministic: accepted

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x + 0.1 * torch.randn_like(x))

    G = GGNOperator(Noisy(), loss_fn, data)
    with pytest.raises(ValueError, match="forward pass is random"):
        G @ torch.zeros(G.shape[0], dtype=torch.float64)


def test_fisher_option_errors(setup):
    model, loss_fn, data = setup
    with pytest.raises(ValueError, match="kind must be one of"):
        FisherOperator(model, loss_fn, data, kind="true")
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1, got 0"):
        FisherOperator(model, loss_fn, data, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="kind='mc' needs the likelihood.*HuberLoss"):
        FisherOperator(model, nn.HuberLoss(), data, kind="mc")


def test_non_finite_loss_is_reported(setup):
    model, _, (X, y) = setup
    X = X.clone()
    X[0, 0] = float("inf")
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(NonFiniteError, match="curvature product .* NaN or infinity in the inputs"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


def test_inputs_are_not_modified(setup):
    model, loss_fn, (X, y) = setup
    X0, y0 = X.clone(), y.clone()
    H = HessianOperator(model, loss_fn, (X, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    v0 = v.clone()
    H @ v
    assert torch.equal(X, X0) and torch.equal(y, y0) and torch.equal(v, v0)
