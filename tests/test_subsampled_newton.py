"""SubsampledNewton's two solves (dense Cholesky, CG) and its growing subsample, against
scikit-learn's solutions and hesse's own curvature operators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hesse
from hesse.func._model import ModelLoss
from hesse.func._output import OutputCurvature
from hesse.operators import _dense as dense_module
from hesse.operators._dense import dense_model_curvature
from hesse.optim import NewtonCG, SubsampledNewton
from hesse.problems import synthetic_logistic
from hesse.solvers._newton import damped_newton_step, subsample_size

pytest.importorskip("sklearn.linear_model")
from conftest import lstsq_data
from conftest import sklearn_logistic as _sklearn_logistic
from conftest import sklearn_lstsq as _sklearn_lstsq

D = torch.float64


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _fit(opt, model, loss_fn, X, y, l2=0.0, steps=60, batch=True):
    """Steps until the gradient's inf-norm is below 1e-15 (or ``steps``); returns the
    closure calls made."""
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        if l2:
            loss = loss + 0.5 * l2 * (model.weight**2).sum()
        loss.backward()
        calls[0] += 1
        return loss

    for _ in range(steps):
        opt.step(closure, batch=(X, y) if batch else None)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if float(grads.abs().max()) <= 1e-15:
            break
    return calls[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- reference solutions -------------------------------------------------------------------
def _logistic_data(kind: str):
    if kind == "independent":
        p = synthetic_logistic(800, 8, seed=1)
    elif kind == "correlated":  # condition number of the covariance: 4e6
        p = synthetic_logistic(800, 8, features="correlated", rho=0.999, seed=2)
    else:  # rank-deficient: a repeated column and a zero one
        p = synthetic_logistic(800, 6, seed=3)
    X, y = p.train
    if kind == "rank-deficient":
        X = torch.cat([X, X[:, :1], torch.zeros(len(X), 1, dtype=D)], 1)
    return X, y, 1.0 / len(X)


SOLVES = {
    "dense": dict(solver="auto", subsample=0.25),
    "dense-growing": dict(solver="auto", subsample=0.05, subsample_growth=0.5),
    "cg": dict(solver="cg", subsample=0.25, cg_max_iter=100),
}


@pytest.mark.parametrize("kind", ["independent", "correlated", "rank-deficient"])
@pytest.mark.parametrize("solve", list(SOLVES))
def test_logistic_reaches_sklearn_solution(kind, solve):
    X, y, l2 = _logistic_data(kind)
    model = nn.Linear(X.shape[1], 1).to(D)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    loss_fn = nn.BCEWithLogitsLoss()
    opt = SubsampledNewton(
        model.parameters(), model=model, loss_fn=loss_fn, l2=l2, max_iter=10, **SOLVES[solve]
    )
    _fit(opt, model, loss_fn, X, y, l2)
    assert _rel(_flat(model), _sklearn_logistic(X, y)) <= 1e-8
    state = opt.global_state()
    assert (state.get("dense_solves", 0) > 0) == (solve != "cg")


@pytest.mark.parametrize("kind", ["well-conditioned", "ill-conditioned", "rank-deficient"])
@pytest.mark.parametrize("solve", ["dense", "cg"])
def test_least_squares_reaches_sklearn_solution(kind, solve):
    X, y = lstsq_data(kind)
    model = nn.Linear(X.shape[1], 1).to(D)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    loss_fn = nn.MSELoss()
    kw = dict(SOLVES[solve], curvature="ggn", max_iter=20)
    if solve == "cg":
        kw["cg_max_iter"] = 200  # condition number 1e8: CG needs its iterations
    opt = SubsampledNewton(model.parameters(), model=model, loss_fn=loss_fn, **kw)
    _fit(opt, model, loss_fn, X, y, steps=40 if solve == "cg" else 10)
    assert _rel(_flat(model), _sklearn_lstsq(X, y)) <= 1e-8


def test_closure_hessian_dense_and_newton_cg_reach_solution():
    """Without a model: the closure's own Hessian, formed densely (solver='cholesky') or by
    CG (NewtonCG shares the loop)."""
    X, y, l2 = _logistic_data("correlated")
    ref = _sklearn_logistic(X, y)
    for make in (
        lambda ps: SubsampledNewton(ps, solver="cholesky", max_iter=30),
        lambda ps: NewtonCG(ps),
    ):
        model = nn.Linear(X.shape[1], 1).to(D)
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        opt = make(model.parameters())
        _fit(opt, model, nn.BCEWithLogitsLoss(), X, y, l2, steps=60, batch=False)
        assert _rel(_flat(model), ref) <= 1e-8


# -- the dense curvature equals the operators' -------------------------------------------
CASES = {  # the linear ones take the closed form, the networks the per-sample Jacobians
    "logistic": (lambda: nn.Linear(6, 1), nn.BCEWithLogitsLoss(), "binary"),
    "multinomial": (lambda: nn.Linear(6, 3), nn.CrossEntropyLoss(), "classes"),
    "linear-no-bias": (lambda: nn.Linear(6, 2, bias=False), nn.MSELoss(), "real"),
    "mlp-ce": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
        nn.CrossEntropyLoss(),
        "classes",
    ),
    "mlp-mse": (
        lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.MSELoss(),
        "real",
    ),
}


def _case(name: str):
    torch.manual_seed(0)
    make, loss_fn, targets = CASES[name]
    model = make().to(D)
    X = torch.randn(40, 6, dtype=D)
    if targets == "binary":
        y = (torch.rand(40, 1) < 0.5).to(D)
    elif targets == "classes":
        y = torch.randint(0, 3, (40,))
    else:
        y = torch.randn(40, 2, dtype=D)
    return model, loss_fn, X, y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("chunked", [False, True])
def test_dense_curvature_equals_operator(name, curvature, chunked, monkeypatch):
    model, loss_fn, X, y = _case(name)
    P = sum(p.numel() for p in model.parameters())
    if chunked:  # the subsample's Jacobian in chunks of 7 samples, weighted as batches
        monkeypatch.setattr(dense_module, "DENSE_ENTRIES", 7 * P * 3)
    fn = ModelLoss(model, loss_fn)
    H = dense_model_curvature(fn, OutputCurvature(loss_fn), (X, y), hessian=curvature == "hessian")
    cls = hesse.HessianOperator if curvature == "hessian" else hesse.GGNOperator
    ref = cls(model, loss_fn, (X, y)).to_dense()
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_dense_curvature_without_the_second_term(name):
    """second_term=False: the matrix where the Hessian is the GGN (a model linear in its
    parameters: the closed form, or a Sequential of one Linear), None where it is not."""
    model, loss_fn, X, y = _case(name)
    fn = ModelLoss(model, loss_fn)
    curv = OutputCurvature(loss_fn)
    H = dense_model_curvature(fn, curv, (X, y), hessian=True, second_term=False)
    G = dense_model_curvature(fn, curv, (X, y), hessian=False, second_term=False)
    ref = hesse.GGNOperator(model, loss_fn, (X, y)).to_dense()
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    if name.startswith("mlp"):
        assert H is None
    else:
        torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)
    seq = nn.Sequential(nn.Linear(6, 2)).to(D)  # linear, but not the closed form's nn.Linear
    fn = ModelLoss(seq, nn.MSELoss())
    Xs, ys = torch.randn(9, 6, dtype=D), torch.randn(9, 2, dtype=D)
    H = dense_model_curvature(
        fn, OutputCurvature(nn.MSELoss()), (Xs, ys), hessian=True, second_term=False
    )
    ref = hesse.HessianOperator(seq, nn.MSELoss(), (Xs, ys)).to_dense()
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


def test_optimizer_dense_curvature_is_the_operators_on_its_subsample():
    """The hook the step uses: the operator's dense matrix on the very subsample drawn,
    plus the penalty's l2 I."""
    model, loss_fn, X, y = _case("mlp-ce")
    opt = SubsampledNewton(model.parameters(), model=model, loss_fn=loss_fn, subsample=9, l2=0.1)
    H = opt._dense_curvature(None, (X, y))
    sub = opt._subsample((X, y))  # the same draw: seeded by the step
    assert len(sub[0]) == 9
    ref = hesse.HessianOperator(model, loss_fn, sub).to_dense() + 0.1 * torch.eye(
        H.shape[0], dtype=D
    )
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)


def test_dense_curvature_of_a_sharded_reducer_is_the_same():
    """Where each process holds a shard (hesse.distributed's reducer is ``sharded``), the
    dense matrix comes from the reduced operator's products instead of one batched pass
    over the local batch: the same matrix."""
    from hesse.optim._base import Reducer

    class Sharded(Reducer):
        sharded = True

    model, loss_fn, X, y = _case("mlp-ce")
    mats = []
    for reducer in (None, Sharded()):
        opt = SubsampledNewton(
            model.parameters(), model=model, loss_fn=loss_fn, subsample=9, l2=0.1
        )
        if reducer is not None:
            opt._reducer = reducer
        assert opt._uses_dense((X, y))
        mats.append(opt._dense_curvature(None, (X, y)))
    torch.testing.assert_close(mats[1], mats[0], rtol=1e-10, atol=1e-12)


# -- the growing subsample ---------------------------------------------------------------
def test_growing_subsample_converges_to_full_data_optimum():
    p = synthetic_logistic(4000, 10, features="correlated", rho=0.99, seed=7)
    X, y = p.train
    full = _sklearn_logistic(X, y)
    first = _sklearn_logistic(X[:200], y[:200])  # a subsample's optimum is far from it
    assert _rel(first, full) > 1e-2
    model = p.make_model()
    opt = SubsampledNewton(
        model.parameters(),
        model=model,
        loss_fn=p.loss_fn,
        l2=p.l2,
        subsample=0.02,
        subsample_growth=0.5,
        max_iter=40,
        # below the gradient at f's rounding (~2e-12 here): met because Armijo judges a
        # step there by its slope (without that, 1 of 6 seed streams wandered to max_iter)
        tolerance_grad=1e-13,
    )
    sizes = []
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = p.loss_fn(model(X), y) + p.regularizer(model)
        loss.backward()
        calls[0] += 1
        sizes.append(opt.global_state().get("subsample_size"))
        return loss

    opt.step(closure, batch=(X, y))
    assert _rel(_flat(model), full) <= 1e-8
    grown = [s for s in sizes if s is not None]
    assert grown[0] == 80 and grown[-1] > 4 * grown[0]  # it grew as the gradient fell
    assert grown == sorted(grown)
    # one closure call per iteration where the first trial step is accepted
    assert calls[0] <= opt.global_state()["step"] + 4


def test_subsample_max_caps_the_growth():
    X, y, l2 = _logistic_data("independent")
    model = nn.Linear(X.shape[1], 1).to(D)
    loss_fn = nn.BCEWithLogitsLoss()
    opt = SubsampledNewton(
        model.parameters(),
        model=model,
        loss_fn=loss_fn,
        l2=l2,
        subsample=40,
        subsample_growth=1.0,
        subsample_max=0.1,
        max_iter=8,
    )
    _fit(opt, model, loss_fn, X, y, l2, steps=1)
    assert opt.global_state()["subsample_size"] == 80  # 10% of 800


def test_subsample_size_rule():
    assert subsample_size(100, 10_000, 1.0, 1.0, 0.5) == 100
    assert subsample_size(100, 10_000, 0.01, 1.0, 0.5) == 1000  # (1 / 0.01) ** 0.5 = 10
    assert subsample_size(100, 10_000, 1e-8, 1.0, 0.5) == 10_000  # capped by the data
    assert subsample_size(100, 10_000, 0.01, 1.0, 0.0) == 100  # no growth
    assert subsample_size(100, 50, 0.01, 1.0, 0.5) == 50


def test_damped_newton_step_indefinite_falls_back_to_eigen_flip():
    H = torch.tensor([[3.0, 0.0], [0.0, -2.0]], dtype=D)
    g = torch.tensor([3.0, 4.0], dtype=D)
    s = damped_newton_step(H, g, 0.5)
    assert not s.positive_definite
    torch.testing.assert_close(s.direction, torch.tensor([-1.0, -2.0], dtype=D))  # |lambda|
    s = damped_newton_step(H + 3 * torch.eye(2, dtype=D), g, 0.5)  # PD: Cholesky of H + mu I
    assert s.positive_definite
    torch.testing.assert_close(s.direction, -torch.linalg.solve(H + 3.5 * torch.eye(2, dtype=D), g))


def test_dense_exact_hessian_on_a_nonconvex_model_descends():
    model, loss_fn, X, y = _case("mlp-ce")
    opt = SubsampledNewton(
        model.parameters(), model=model, loss_fn=loss_fn, subsample=1.0, max_iter=5
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(4):
        opt.step(closure, batch=(X, y))
    assert float(closure().detach()) < 0.5 * first
    assert opt.global_state()["dense_solves"] > 0


def test_options_are_checked():
    model = nn.Linear(3, 1)
    for bad in (
        dict(solver="qr"),
        dict(dense_max=-1),
        dict(subsample_growth=-0.5),
        dict(subsample_max=0),
        dict(max_iter=0),
        dict(tolerance_grad=math.nan),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SubsampledNewton(model.parameters(), **bad)
