"""Shared models, data and float64 references (independent of hesse's own code paths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call


def mlp(seed: int = 0, d_in: int = 5, hidden: int = 7, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Sigmoid(),
        nn.Linear(hidden, d_out),
    ).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2),
        nn.Tanh(),
        nn.Conv2d(2, 3, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 1 * 1, 3),
    ).double()


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    # give the running statistics non-trivial values
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def make_data(
    loss: str, n: int = 12, d_in: int = 5, d_out: int = 3, seed: int = 1, image: bool = False
):
    g = torch.Generator().manual_seed(seed)
    X = (
        torch.randn(n, 1, 7, 7, generator=g, dtype=torch.float64)
        if image
        else torch.randn(n, d_in, generator=g, dtype=torch.float64)
    )
    if loss == "ce":
        y = torch.randint(0, d_out, (n,), generator=g)
    elif loss == "bce":
        y = torch.randint(0, 2, (n, d_out), generator=g).double()
    else:
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return X, y


LOSSES = {
    "mse": lambda: nn.MSELoss(),
    "ce": lambda: nn.CrossEntropyLoss(),
    "bce": lambda: nn.BCEWithLogitsLoss(),
}


def flat_params(model, names=None):
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def _unflat(model, names, theta):
    named = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        k = named[n].numel()
        out[n] = theta[i : i + k].view_as(named[n])
        i += k
    return out


def ref_hessian(model, loss_fn, X, y, names=None):
    """Dense Hessian of the loss over the whole batch by torch.autograd.functional.hessian."""
    names, theta = flat_params(model, names)
    bufs = {n: b.clone() for n, b in model.named_buffers()}

    def f(t):
        return loss_fn(functional_call(model, {**_unflat(model, names, t), **bufs}, (X,)), y)

    return torch.autograd.functional.hessian(f, theta)


def ref_jacobian_and_output_hessian(model, loss_fn, X, y):
    names, theta = flat_params(model)

    def out_fn(t):
        return functional_call(model, _unflat(model, names, t), (X,))

    out = out_fn(theta)
    J = torch.autograd.functional.jacobian(lambda t: out_fn(t).reshape(-1), theta)
    Ho = torch.autograd.functional.hessian(
        lambda o: loss_fn(o.view_as(out), y), out.detach().reshape(-1)
    )
    return J, Ho


def ref_ggn(model, loss_fn, X, y):
    J, Ho = ref_jacobian_and_output_hessian(model, loss_fn, X, y)
    return J.T @ Ho @ J


@pytest.fixture(params=["mse", "ce", "bce"])
def loss_name(request):
    return request.param


# -- scikit-learn references (the tests that use them skip without scikit-learn) ------------
def sklearn_logistic(X, y) -> torch.Tensor:
    """scikit-learn's L2 logistic regression with C = 1: the minimiser of
    mean BCE + ||w||^2 / (2 n) (intercept not penalised), to its tightest tolerance;
    coefficients then intercept."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-15, max_iter=500)
    m.fit(X.numpy(), y.numpy().ravel())
    return torch.cat([torch.from_numpy(m.coef_.ravel()), torch.from_numpy(m.intercept_)])


def sklearn_lstsq(X, y) -> torch.Tensor:
    """scikit-learn's least squares with intercept (the minimum-norm coefficients)."""
    from sklearn.linear_model import LinearRegression

    m = LinearRegression().fit(X.numpy(), y.numpy().ravel())
    return torch.cat([torch.from_numpy(m.coef_.ravel()), torch.tensor([float(m.intercept_)])])


def lstsq_data(kind: str):
    """600 samples of 8 features and a noisy linear target (well-conditioned,
    ``"ill-conditioned"`` or ``"rank-deficient"``), for the least-squares tests of
    the subsampled Newton methods."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(600, 8, generator=g, dtype=torch.float64)
    if kind == "ill-conditioned":  # column scales 1 to 1e-3: the Hessian's condition 1e6
        X = X * torch.logspace(0, -3, 8, dtype=torch.float64)
    elif kind == "rank-deficient":  # two columns repeat others: rank 6 of 8
        X[:, 6] = X[:, 0]
        X[:, 7] = X[:, 1] - X[:, 2]
    w = torch.randn(8, generator=g, dtype=torch.float64)
    y = (X @ w + 0.3 + 0.1 * torch.randn(600, generator=g, dtype=torch.float64))[:, None]
    return X, y
