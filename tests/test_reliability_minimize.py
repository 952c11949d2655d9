"""Issue 14, "no silent wrong answer": a minimisation whose objective does not reach ``x``,
an option that silently turns a test off, and cross-entropy labels outside the classes all
raise instead of returning a plausible result."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hesse
from hesse import fisher_vp, ggn_vp, minimize
from hesse.func import OutputCurvature
from hesse.func._output import loss_normalizer

f64 = torch.float64
_W = torch.ones(2, dtype=f64, requires_grad=True)


# -- 1. an objective whose graph does not reach x ----------------------------------------
@pytest.mark.parametrize(
    "fun",
    [
        lambda x: ((x.detach() - 1) ** 2).sum(),
        lambda x: torch.tensor(((x.detach().numpy() - 1) ** 2).sum()),
        lambda x: torch.tensor(3.0, dtype=f64),  # constant: nothing to minimise
        lambda x: (x.argmax() - 1.0) ** 2,  # only through a non-differentiable operation
        lambda x, w=_W: (w**2).sum(),  # a graph, but not through x
    ],
    ids=["detach", "numpy", "constant", "argmax", "other-leaf"],
)
@pytest.mark.parametrize("method", ["bfgs", "newton", "trust-ncg", "nag"])
def test_objective_without_autograd_path_to_x_raises(fun, method):
    x0 = torch.zeros(2, dtype=f64)
    with pytest.raises(ValueError, match="does not depend on x through autograd.*detached"):
        minimize(fun, x0, method)


def test_user_grad_is_unaffected_by_the_autograd_path_check():
    fun = lambda x: ((x.detach() - 1) ** 2).sum()  # noqa: E731
    r = minimize(fun, torch.zeros(2, dtype=f64), "bfgs", grad=lambda x: 2 * (x - 1))
    assert r.success
    torch.testing.assert_close(r.x, torch.ones(2, dtype=f64))


def test_only_the_start_must_reach_x():
    # Flat (a Python branch, no graph) away from the start: later points are not an error.
    def fun(x):
        return (x**2).sum() if float(x.detach().sum()) > 0.5 else torch.tensor(0.0, dtype=f64)

    r = minimize(fun, torch.ones(2, dtype=f64), "bfgs")
    assert math.isfinite(float(r.fun))


# -- 2. options validated, 0 meaning 0 ---------------------------------------------------
def _saddle(x):
    # A saddle at 0 with curvature -1e-6 along x1 (below the default curvature_tol of
    # eps^(1/3) = 6e-6 in magnitude); the minima are at x1 = +-1e-3.
    return x[0] ** 2 - 0.5e-6 * x[1] ** 2 + 0.25 * x[1] ** 4


def test_curvature_tol_zero_means_zero_not_the_default():
    x0 = torch.tensor([1.0, 0.0], dtype=f64)
    flat = minimize(_saddle, x0, "newton")  # default: -1e-6 counts as flat
    assert flat.success and float(flat.x[1]) == 0.0
    r = minimize(_saddle, x0, "newton", tol=1e-14, options={"curvature_tol": 0.0})
    assert r.success, r.message
    assert abs(abs(float(r.x[1])) - 1e-3) < 1e-6
    assert float(r.fun) < -2e-13


@pytest.mark.parametrize(
    "key, value",
    [
        ("curvature_tol", math.nan),
        ("curvature_tol", math.inf),
        ("curvature_tol", -1e-3),
        ("curvature_tol", "1e-3"),
        ("gtol", math.nan),
        ("gtol", math.inf),
        ("grad_rtol", math.nan),
        ("ftol", math.inf),
        ("xtol", -1.0),
        ("c1", math.nan),
        ("c2", math.nan),
        ("initial_radius", math.inf),
        ("max_radius", math.nan),
        ("max_radius", 0.5),  # below the default initial_radius of 1
        ("max_fev", 2.0),
        ("cg_max_iter", 0),
        ("history", "yes"),
        ("saddle_check", "no"),
    ],
)
def test_bad_option_values_raise_naming_option_and_value(key, value):
    method = "newton-cg" if key == "cg_max_iter" else "trust-ncg"
    if key in ("c1", "c2"):
        method = "bfgs"
    with pytest.raises(ValueError, match=key) as err:
        minimize(lambda x: (x**2).sum(), torch.ones(2, dtype=f64), method, options={key: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("kw", [{"tol": math.inf}, {"tol": math.nan}, {"max_iter": 10.0}])
def test_bad_tol_and_max_iter_raise(kw):
    key, value = next(iter(kw.items()))
    with pytest.raises(
        ValueError, match=rf"{key} must be a(n integer >= 1| finite real number > 0), got"
    ) as err:
        minimize(lambda x: (x**2).sum(), torch.ones(2, dtype=f64), **kw)
    assert repr(value) in str(err.value)


def test_good_option_values_still_accepted():
    f = lambda x: (x**2).sum()  # noqa: E731
    x0 = torch.ones(2, dtype=f64)
    r = minimize(f, x0, "l-bfgs", max_iter=np.int64(50), options={"memory": np.int64(3)})
    assert r.success
    r = minimize(f, x0, "trust-ncg", options={"gtol": 0, "ftol": 1e-12, "curvature_tol": 1e-4})
    assert r.success


# -- 3. cross-entropy labels outside the classes -----------------------------------------
def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 2).to(f64)
    X = torch.randn(6, 3, generator=g, dtype=f64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=f64)
    return model, X, v


@pytest.mark.parametrize("bad", [7, 2, -1])
@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 3.0], dtype=f64)])
@pytest.mark.parametrize(
    "make",
    [
        lambda m, lf, d: hesse.GGNOperator(m, lf, d),
        lambda m, lf, d: hesse.FisherOperator(m, lf, d, kind="empirical"),
        lambda m, lf, d: hesse.FisherOperator(m, lf, d, kind="mc"),
    ],
    ids=["ggn", "ef", "mc"],
)
def test_labels_outside_the_classes_raise(make, weight, bad):
    # CrossEntropyLoss itself raises here (on CUDA: a device-side assert); with class
    # weights the closed form used to clamp label 7 onto the last class's weight.
    model, X, v = _problem()
    y = torch.tensor([0, 1, bad, 1, 0, bad])
    classes = "" if bad < 0 else ".*2 classes"  # a negative label is caught before C is known
    with pytest.raises(ValueError, match=rf"label\(s\) {bad}\b{classes}"):
        make(model, nn.CrossEntropyLoss(weight=weight), (X, y)) @ v


@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 3.0], dtype=f64)])
@pytest.mark.parametrize("kind", ["ggn", "empirical", "mc"])
def test_labels_outside_the_classes_raise_in_the_output_curvature(kind, weight):
    model, X, v = _problem()
    lf = nn.CrossEntropyLoss(weight=weight)
    y = torch.tensor([0, 1, 7, 1, 0, 7])
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out_fn = lambda x: X @ x[:6].reshape(2, 3).T + x[6:]  # noqa: E731
    curv = OutputCurvature(lf)
    with pytest.raises(ValueError, match=r"\[0, 2\).*label\(s\) 7 for 2 classes \(2 of 6"):
        if kind == "ggn":
            ggn_vp(out_fn, lf, x, v, targets=y)
        else:
            fisher_vp(out_fn, lf, x, v, targets=y, kind=kind)
    out = out_fn(x)
    with pytest.raises(ValueError, match="label"):
        curv.hessian_mm(out, y, torch.ones(1, *out.shape, dtype=f64))
    curv.check_targets(out, torch.tensor([0, 1, -100, 1, 0, 1]))  # valid: no error


@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 3.0], dtype=f64)])
def test_ignored_labels_still_work(weight):
    # ignore_index=-100 positions drop out: the same curvature as without those samples.
    model, X, v = _problem(1)
    y = torch.tensor([0, -100, 1, 1, -100, 0])
    keep = y != -100
    lf = nn.CrossEntropyLoss(weight=weight)
    for make in (hesse.GGNOperator, hesse.FisherOperator):
        torch.testing.assert_close(
            make(model, lf, (X, y)) @ v, make(model, lf, (X[keep], y[keep])) @ v
        )


def test_normalizer_checks_labels_when_it_knows_the_classes():
    y = torch.tensor([0, 1, -100, 2])
    w = torch.tensor([1.0, 3.0])
    assert loss_normalizer(nn.CrossEntropyLoss(), None, y) == 3.0  # C unknown, all >= 0
    with pytest.raises(ValueError, match=r"label\(s\) 2 for 2 classes"):
        loss_normalizer(nn.CrossEntropyLoss(weight=w), None, y)
    with pytest.raises(ValueError, match=r"label\(s\) 2 for 2 classes"):
        loss_normalizer(nn.CrossEntropyLoss(), (4, 2), y)
    with pytest.raises(ValueError, match=r"label\(s\) -1"):
        loss_normalizer(nn.CrossEntropyLoss(), None, torch.tensor([0, -1]))
    assert loss_normalizer(nn.CrossEntropyLoss(weight=w), None, y[:3]) == 4.0
