"""hesse.optim: convergence to scikit-learn's optimum, exact resumption, robustness, and one
contract suite over every optimizer."""

import copy
import math

import pytest
import torch
from torch import nn

from hesse.optim import LBFGS, AdaHessian, HessianFree, NewtonCG, Sophia, SubsampledNewton, compare

f64 = torch.float64
LAM = 1e-3


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    clf = LogisticRegression(
        C=1.0 / (len(y) * LAM), fit_intercept=False, tol=1e-10, max_iter=1000, solver="newton-cg"
    ).fit(X, y)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    f_ref = float(_objective(torch.tensor(clf.coef_), Xt, yt))
    return Xt, yt, f_ref


def _objective(W, X, y):
    return nn.functional.cross_entropy(X @ W.T, y) + 0.5 * LAM * (W**2).sum()


CE = nn.CrossEntropyLoss()
CONVEX = {
    "HessianFree": lambda m: HessianFree(m.parameters()),
    "HessianFree-ggn": lambda m: HessianFree(m.parameters(), model=m, loss_fn=CE),
    "SubsampledNewton": lambda m: SubsampledNewton(m.parameters()),
    "SubsampledNewton-model": lambda m: SubsampledNewton(
        m.parameters(), model=m, loss_fn=CE, subsample=1.0
    ),
    "NewtonCG": lambda m: NewtonCG(m.parameters()),
    "LBFGS": lambda m: LBFGS(m.parameters()),
}


@pytest.mark.parametrize("name", list(CONVEX))
def test_digits_logistic_regression_reaches_sklearn_optimum(digits, name):
    """Multinomial logistic regression on the digits data (convex): the L2-regularised loss
    within 1e-6 (relative) of scikit-learn's optimum."""
    X, y, f_ref = digits
    torch.manual_seed(0)
    model = nn.Linear(64, 10, bias=False).double()
    opt = CONVEX[name](model)
    ggn_penalty = name in ("HessianFree-ggn", "SubsampledNewton-model")

    def closure():
        opt.zero_grad()
        loss = _objective(model.weight, X, y)
        loss.backward()
        return loss

    for _ in range(60):
        if ggn_penalty:  # curvature of the data term on the batch; the penalty is in the loss
            opt.step(closure, batch=(X, y))
        else:
            opt.step(closure)
        with torch.no_grad():
            f = float(_objective(model.weight, X, y))
        if f - f_ref <= 1e-6 * f_ref:
            break
    assert f - f_ref <= 1e-6 * f_ref
    assert f >= f_ref * (1 - 1e-9)  # not below the optimum: the reference is right


# -- the contract suite ----------------------------------------------------------------
def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype=torch.float32, n=48):
    """Inputs and the labels of a random linear teacher (learnable, unlike random labels)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=dtype)
    teacher = torch.randn(5, 3, generator=g, dtype=dtype)
    return X, (X @ teacher).argmax(1)


ALL = {
    "HessianFree": (lambda m: HessianFree(m.parameters()), {"lr": 0.0}),
    "SubsampledNewton": (lambda m: SubsampledNewton(m.parameters()), {"damping": -1.0}),
    "NewtonCG": (lambda m: NewtonCG(m.parameters()), {"cg_max_iter": 0}),
    "LBFGS": (lambda m: LBFGS(m.parameters()), {"history_size": 0}),
    "AdaHessian": (lambda m: AdaHessian(m.parameters()), {"betas": (0.9, 1.0)}),
    "Sophia": (lambda m: Sophia(m.parameters(), lr=0.01, update_each=2), {"rho": 0.0}),
}
CLASSES = {
    "HessianFree": HessianFree,
    "SubsampledNewton": SubsampledNewton,
    "NewtonCG": NewtonCG,
    "LBFGS": LBFGS,
    "AdaHessian": AdaHessian,
    "Sophia": Sophia,
}


def _closure(model, opt, X, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    return closure


def _run(model, opt, steps, X, y):
    closure = _closure(model, opt, X, y)
    losses = [float(opt.step(closure)) for _ in range(steps)]
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(ALL))
def test_contract_trains_with_a_plain_closure(name):
    model = _mlp()
    X, y = _data()
    opt = ALL[name][0](model)
    losses, _ = _run(model, opt, 25 if name in ("AdaHessian", "Sophia") else 10, X, y)
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(X), y))
    assert final < 0.8 * losses[0]
    for p in model.parameters():
        assert p.grad is None or p.grad.grad_fn is None  # no graph left on .grad


@pytest.mark.parametrize("name", list(ALL))
def test_contract_validates_hyperparameters(name):
    bad = ALL[name][1]
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key.split("[")[0]):
        CLASSES[name](_mlp().parameters(), **bad)


@pytest.mark.parametrize("name", list(ALL))
def test_contract_state_dict_resumes_exactly(name):
    X, y = _data()
    model_a = _mlp()
    opt_a = ALL[name][0](model_a)
    _run(model_a, opt_a, 4, X, y)
    saved_model = copy.deepcopy(model_a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    losses_a, params_a = _run(model_a, opt_a, 4, X, y)

    model_b = _mlp()
    model_b.load_state_dict(saved_model)
    opt_b = ALL[name][0](model_b)
    opt_b.load_state_dict(saved_opt)
    losses_b, params_b = _run(model_b, opt_b, 4, X, y)
    assert losses_a == losses_b
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_contract_keeps_dtype_and_handles_param_groups(name, dtype):
    model = _mlp(dtype)
    X, y = _data(dtype)
    make = CLASSES[name]
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = make(
        [{"params": first}, {"params": second}],
        **({"lr": 0.05} if name in ("AdaHessian", "Sophia") else {}),
    )
    losses, params = _run(model, opt, 5, X, y)
    assert all(p.dtype == dtype for p in params)
    assert losses[-1] < losses[0]
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == dtype


@pytest.mark.parametrize("name", list(ALL))
def test_contract_closure_is_required(name):
    opt = ALL[name][0](_mlp())
    with pytest.raises((RuntimeError, TypeError)):
        opt.step()
    with pytest.raises(TypeError, match="closure must return the loss"):
        opt.step(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(ALL))
def test_contract_cuda(name):
    model = _mlp().cuda()
    X, y = (t.cuda() for t in _data())
    opt = ALL[name][0](model)
    losses, params = _run(model, opt, 5, X, y)
    assert losses[-1] < losses[0] and all(p.is_cuda for p in params)


# -- L-BFGS robustness -----------------------------------------------------------------
def test_lbfgs_survives_a_nan_step():
    """The loss turns NaN on a few calls (a bad batch, an overflow): hesse's L-BFGS backs
    off and still reaches the optimum."""
    target = torch.tensor([1.0, -2.0, 3.0], dtype=f64)

    def run(make):
        w = torch.zeros(3, dtype=f64, requires_grad=True)
        opt = make([w])
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            loss = ((w - target) ** 2 * torch.tensor([1.0, 10.0, 100.0], dtype=f64)).sum()
            if calls["n"] in (3, 4):
                loss = loss * math.nan
            loss.backward()
            return loss

        for _ in range(10):
            opt.step(closure)
        return w.detach()

    ours = run(lambda p: LBFGS(p, max_iter=5))
    torch.testing.assert_close(ours, target)


def test_lbfgs_starting_step_with_nan_restores_best_point():
    w = torch.tensor([5.0], dtype=f64, requires_grad=True)
    opt = LBFGS([w], max_iter=3)
    state = {"nan": False}

    def closure():
        opt.zero_grad()
        loss = ((w - 1) ** 2).sum() * (math.nan if state["nan"] else 1.0)
        loss.backward()
        return loss

    opt.step(closure)
    good = w.detach().clone()
    state["nan"] = True
    assert math.isnan(float(opt.step(closure)))
    assert torch.equal(w.detach(), good)
    state["nan"] = False
    opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.ones(1, dtype=f64))


def test_lbfgs_batch_mode_is_stable_on_minibatches():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 10, generator=g, dtype=f64)
    w_true = torch.randn(10, generator=g, dtype=f64)
    y = X @ w_true + 0.1 * torch.randn(512, generator=g, dtype=f64)
    w = torch.zeros(10, dtype=f64, requires_grad=True)
    opt = LBFGS([w], batch_mode=True, lr=0.5)
    for _ in range(8):
        for idx in torch.randperm(512, generator=g).split(64):

            def closure(idx=idx):
                opt.zero_grad()
                loss = ((X[idx] @ w - y[idx]) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
    assert float((w.detach() - w_true).norm()) < 0.05


# -- the diagonal optimizers and the harness --------------------------------------------
def test_adahessian_and_sophia_share_the_hutchinson_estimate():
    """On a separable quadratic the Hessian diagonal is exact with any Rademacher probe:
    both optimizers' estimates equal it."""
    a = torch.tensor([1.0, 4.0, 9.0], dtype=f64)
    for make, key in (
        (lambda p: AdaHessian(p), "hess_diag"),
        (lambda p: Sophia(p, update_each=1), "hessian"),
    ):
        w = torch.ones(3, dtype=f64, requires_grad=True)
        opt = make([w])

        def closure(opt=opt, w=w):
            opt.zero_grad()
            loss = 0.5 * (a * w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        est = opt.state[w][key]
        scale = 1.0 if key == "hess_diag" else 1 - 0.99  # Sophia's first EMA step
        torch.testing.assert_close(est, scale * a)


@pytest.mark.parametrize(
    "make, settings",
    [
        (AdaHessian, {"update_each": 3, "n_samples": 2, "seed": 5, "lr": 0.05}),
        (Sophia, {"update_each": 2, "estimator": "hutchinson", "seed": 7, "lr": 0.01}),
        (LBFGS, {"history_size": 3, "max_iter": 2, "line_search": "armijo"}),
    ],
    ids=["AdaHessian", "Sophia", "LBFGS"],
)
def test_state_dict_records_every_setting(make, settings):
    """Settings such as update_each and seed live in param_groups: an optimizer made with
    the defaults and given the state_dict of one made otherwise continues exactly as it."""
    X, y = _data()
    model_a = _mlp()
    opt_a = make(model_a.parameters(), **settings)
    _run(model_a, opt_a, 3, X, y)
    saved_model = copy.deepcopy(model_a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    for key, value in settings.items():
        assert saved_opt["param_groups"][0][key] == value
    losses_a, params_a = _run(model_a, opt_a, 4, X, y)

    model_b = _mlp()
    model_b.load_state_dict(saved_model)
    opt_b = make(model_b.parameters())  # the defaults
    opt_b.load_state_dict(saved_opt)
    for key, value in settings.items():
        if key != "lr":
            assert getattr(opt_b, key, opt_b.param_groups[0][key]) == value
    losses_b, params_b = _run(model_b, opt_b, 4, X, y)
    assert losses_a == losses_b
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, key, value",
    [(AdaHessian, "update_each", 2), (Sophia, "seed", 3), (LBFGS, "history_size", 5)],
)
def test_a_setting_of_the_whole_optimizer_is_the_same_in_every_group(make, key, value):
    model = _mlp()
    X, y = _data()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = make([{"params": first}, {"params": second, key: value}])
    with pytest.raises(ValueError, match=f"{key} is one setting of the whole"):
        opt.step(_closure(model, opt, X, y))


def test_a_state_saved_before_the_settings_were_recorded_still_loads():
    """A state_dict without update_each/seed/n_samples in its groups (saved by an earlier
    version) keeps this optimizer's."""
    X, y = _data()
    model = _mlp()
    opt = AdaHessian(model.parameters(), lr=0.05, update_each=2, seed=3)
    _run(model, opt, 2, X, y)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("update_each", "n_samples", "seed"):
            del group[key]
    fresh = AdaHessian(model.parameters(), lr=0.05, update_each=2, seed=3)
    fresh.load_state_dict(old)
    assert (fresh.update_each, fresh.seed, fresh.n_samples) == (2, 3, 1)
    _run(model, fresh, 2, X, y)


def test_sophia_gnb_estimator():
    model = _mlp()
    X, y = _data()
    opt = Sophia(model.parameters(), lr=0.02, estimator="gnb", update_each=1)
    closure = _closure(model, opt, X, y)
    with pytest.raises(ValueError, match="outputs_fn"):
        opt.step(closure)
    first = float(opt.step(closure, outputs_fn=lambda: model(X)))
    for _ in range(20):
        last = float(opt.step(closure, outputs_fn=lambda: model(X)))
    assert last < first
    assert all(float(opt.state[p]["hessian"].min()) >= 0 for p in model.parameters())


def test_compare_runs_on_equal_terms():
    X, y = _data(n=96)
    curves = compare(
        _mlp,
        nn.functional.cross_entropy,
        (X, y),
        {
            "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
            "lbfgs": lambda m: LBFGS(m.parameters(), batch_mode=True, lr=0.2),
            "hf": lambda m: HessianFree(m.parameters(), model=m, loss_fn=CE),
        },
        epochs=3,
        batch_size=32,
        test_data=(X, y),
        metric=lambda out, t: float((out.argmax(1) == t).float().mean()),
    )
    starts = {c.loss[0] for c in curves.values()}
    assert len(starts) == 1  # the same initial weights
    for c in curves.values():
        assert c.steps[-1] == 9 and len(c.loss) == 4 and len(c.test) == 4
        assert c.time == sorted(c.time) and c.loss[-1] < c.loss[0]
    with pytest.raises(ValueError, match="budget"):
        compare(_mlp, nn.functional.cross_entropy, (X, y), {})


def test_truncated_newton_survives_an_overflowing_curvature_product():
    """float32: the gradient is finite but H g overflows. The step keeps the parameters,
    raises the damping and does not raise."""
    w = torch.tensor([1e9], requires_grad=True)
    opt = HessianFree([w], preconditioner=None)

    def closure():
        opt.zero_grad()
        loss = 1e19 * (w**2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    opt.step(closure)
    assert torch.equal(w.detach(), before)
    assert opt.state[w]["damping"] > 1.0
