"""hesse.analysis: eigenvalues, condition number, convexity verdicts, per-layer reports."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import hesse
from conftest import make_data, mlp, ref_hessian
from hesse.analysis import Verdict, verdict


@pytest.mark.parametrize(
    "lo,hi,want",
    [
        (1.0, 2.0, "positive_definite"),
        (0.0, 2.0, "positive_semidefinite"),
        (-1e-9, 2.0, "positive_semidefinite"),
        (-1.0, 2.0, "indefinite"),
        (-2.0, 0.0, "negative_semidefinite"),
        (-2.0, -1.0, "negative_definite"),
        (0.0, 0.0, "positive_semidefinite"),
    ],
)
def test_verdict_rule(lo, hi, want):
    assert verdict(lo, hi, 1e-8) == want


def _f64(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_convexity_of_functions_with_known_answers():
    bowl = hesse.convexity(lambda z: (z**2).sum(), _f64(0.3, -0.2))
    assert bowl.verdict == Verdict.POSITIVE_DEFINITE and bowl.is_convex
    assert bowl.min_eigenvalue == pytest.approx(2.0) and bowl.direction is None
    assert not bowl.is_saddle

    saddle = hesse.convexity(lambda z: z[0] ** 2 - z[1] ** 2, _f64(0.0, 0.0))
    assert saddle.verdict == "indefinite" and saddle.is_saddle
    assert saddle.min_eigenvalue == pytest.approx(-2.0)
    torch.testing.assert_close(saddle.direction.abs(), _f64(0.0, 1.0))  # along y

    away = hesse.convexity(lambda z: z[0] ** 2 - z[1] ** 2, _f64(1.0, 1.0))
    assert away.verdict == "indefinite" and not away.is_saddle  # gradient is not zero

    cap = hesse.convexity(lambda z: -(z**2).sum(), _f64(0.5, 0.5))
    assert cap.verdict == Verdict.NEGATIVE_DEFINITE and not cap.is_convex

    flat = hesse.convexity(lambda z: z[0] ** 2, _f64(1.0, 2.0))
    assert flat.verdict == Verdict.POSITIVE_SEMIDEFINITE


def test_convexity_over_sets_of_points():
    def f(z):  # x^2 - y^2 + y^4/4: convex in y only for |y| >= sqrt(2/3)
        return z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4

    seg = hesse.convexity(f, segment=(_f64(0.0, -2.0), _f64(0.0, 2.0)), num_points=41)
    assert seg.points == 41 and seg.verdict == "indefinite"
    ys = torch.linspace(-2, 2, 41, dtype=torch.float64)
    want = float((3 * ys**2 - 2 < 0).double().mean())  # f_yy = 3y^2 - 2
    assert seg.share_nonconvex == pytest.approx(want)
    torch.testing.assert_close(seg.worst_point, _f64(0.0, 0.0))
    assert seg.min_eigenvalue == pytest.approx(-2.0)

    box = hesse.convexity(
        lambda z: (z**2).sum() + z.prod(), _f64(0.0, 0.0), box=(-1.0, 1.0), num_points=10, seed=0
    )
    assert box.verdict == "positive_definite" and box.share_nonconvex == 0.0

    pts = torch.stack([_f64(0.0, 0.0), _f64(0.0, 1.5)])
    some = hesse.convexity(f, points=pts)
    assert some.share_nonconvex == 0.5 and len(some.reports) == 2


def test_convexity_of_logistic_regression_and_of_a_deep_net():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(X, y)
    w0 = torch.as_tensor(np.concatenate([clf.coef_[0], clf.intercept_]))
    Xt = torch.as_tensor(np.hstack([X, np.ones((len(X), 1))]))
    yt = torch.as_tensor(y, dtype=torch.float64)

    def loss(w):
        return nn.functional.binary_cross_entropy_with_logits(Xt @ w, yt) + (w[:-1] ** 2).sum() / (
            2 * len(X)
        )

    r = hesse.convexity(loss, w0)
    assert r.verdict == "positive_definite"
    assert r.gradient_norm < 1e-6  # sklearn's optimum

    model = mlp(seed=3)
    Xm, ym = make_data("ce", n=40)
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), (Xm, ym))
    net = hesse.convexity(H)
    exact = np.linalg.eigvalsh(ref_hessian(model, nn.CrossEntropyLoss(), Xm, ym).numpy())
    assert net.verdict == "indefinite"
    assert net.min_eigenvalue == pytest.approx(exact[0], rel=1e-8)
    assert net.max_eigenvalue == pytest.approx(exact[-1], rel=1e-8)
    # through Lanczos instead of the dense matrix: the same verdict, certified residuals
    big = hesse.convexity(H, dense_limit=10, lanczos_tol=1e-6, max_iter=122, seed=0)
    assert big.verdict == "indefinite" and not big.exact and big.matvecs > 0
    assert big.min_eigenvalue == pytest.approx(exact[0], rel=1e-4)


def test_condition_number_and_wrappers_on_a_known_matrix():
    lam = torch.cat([torch.tensor([100.0]), torch.linspace(1.0, 2.0, 49)]).double()
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    c = hesse.condition_number(A, tol=1e-8, seed=0)
    assert c.success and c.value == pytest.approx(100.0, rel=1e-6)
    indefinite = hesse.condition_number(-A + 50 * torch.eye(50, dtype=torch.float64), seed=0)
    assert math.isinf(indefinite.value)
    t = hesse.trace(A, method="xtrace", num_matvecs=100, seed=0)
    # 50 probes, each used twice, span the whole space of a 50x50 matrix: exact
    assert t.estimate == pytest.approx(float(lam.sum()), rel=1e-6)
    d = hesse.diagonal(A, method="exact")
    torch.testing.assert_close(d.estimate, torch.diagonal(A))
    e = hesse.eigenvalues(A, k=1, seed=0, tol=1e-8)
    assert float(e.eigenvalues[0]) == pytest.approx(100.0)


def test_condition_number_messages_come_from_the_status_templates():
    # what to change after each ending is the status's one template (hesse.linalg.Status),
    # in linalg's names; a non-finite product never advises more iterations
    import dataclasses

    from hesse.linalg import Status

    lam = torch.logspace(-3, 2, 60, dtype=torch.float64)
    c = hesse.condition_number(torch.diag(lam), tol=1e-12, max_iter=4, seed=0)
    assert c.status is Status.MAX_ITERATIONS and not c.success
    assert "did not converge (max_iterations)" in c.message
    assert f"{Status.MAX_ITERATIONS.advice()} (the bottom of a Hessian" in c.message
    bad = dataclasses.replace(c, status=Status.NON_FINITE)
    assert bad.message.endswith("; check the model, the data and the dtype")
    assert "max_iter" not in bad.message
    low = dataclasses.replace(c, status=Status.PRECISION)
    assert "not resolved" in low.message and low.message.endswith(Status.PRECISION.advice())


def test_layer_report_matches_the_dense_blocks():
    model = mlp()
    X, y = make_data("ce")
    loss_fn = nn.CrossEntropyLoss()
    rep = hesse.layer_report(model, loss_fn, (X, y), tol=1e-8, max_iter=60)
    assert [r.name for r in rep.rows] == ["0", "2", "4"]
    H = ref_hessian(model, loss_fn, X, y)
    start = 0
    for row, layer in zip(rep.rows, [model[0], model[2], model[4]]):
        n = sum(p.numel() for p in layer.parameters())
        block = H[start : start + n, start : start + n]
        start += n
        lam = np.linalg.eigvalsh(block.numpy())
        assert row.size == n and row.converged
        assert row.top_eigenvalue == pytest.approx(lam[-1], rel=1e-6)
        assert row.min_eigenvalue == pytest.approx(lam[0], rel=1e-6, abs=1e-10)
        assert row.trace == pytest.approx(float(torch.trace(block)), rel=1e-10)
    # the last layer of a cross-entropy model is convex in its own weights
    assert rep.rows[-1].verdict in ("positive_semidefinite", "positive_definite")
    assert "verdict" in rep.to_table() and rep.as_dicts()[0]["name"] == "0"


def test_analysis_errors():
    with pytest.raises(ValueError, match="an operator has no points"):
        hesse.convexity(torch.eye(2), _f64(0.0, 0.0))
    with pytest.raises(TypeError, match="convexity takes a function"):
        hesse.convexity(3.0)
    with pytest.raises(ValueError, match="at most one of points, box and segment"):
        hesse.convexity(
            lambda z: (z**2).sum(), _f64(0.0), box=(-1, 1), segment=(_f64(0.0), _f64(1.0))
        )
    with pytest.raises(ValueError, match="method must be one of"):
        hesse.trace(torch.eye(3), method="exact")


def test_plots_are_written(tmp_path):
    import hesse.plot as hp

    model = mlp()
    X, y = make_data("ce", n=32)
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    hp.spectral_density(
        hesse.spectral_density(H, num_probes=3, steps=20, seed=0), path=tmp_path / "density.png"
    )
    hp.eigenvalues(hesse.eigenvalues(H, k=4, seed=0), path=tmp_path / "top.png")
    fig = hp.layer_report(
        hesse.layer_report(model, nn.CrossEntropyLoss(), (X, y)), path=tmp_path / "layers.png"
    )
    for name in ("density.png", "top.png", "layers.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert fig.axes[0].get_yscale() == "log"


def test_an_unconverged_bottom_end_is_not_certified_as_convex():
    evs = torch.cat(
        [
            torch.linspace(0, 100, 1999, dtype=torch.float64) ** 2 / 100,
            torch.tensor([-1e-3], dtype=torch.float64),
        ]
    )
    with pytest.warns(hesse.linalg.ConvergenceWarning, match="not certified"):
        rep = hesse.convexity(hesse.DiagonalOperator(evs), dense_limit=10, max_iter=50, seed=0)
    assert not rep.certified and rep.verdict != "indefinite"
    # a negative Ritz value proves negative curvature: certain without convergence
    neg = torch.cat([torch.linspace(1, 2, 1999, dtype=torch.float64), torch.tensor([-5.0])])
    found = hesse.convexity(
        hesse.DiagonalOperator(neg.double()), dense_limit=10, max_iter=50, seed=0
    )
    assert found.verdict == "indefinite" and found.certified


def test_linearized_block_notices_changes_to_other_layers():
    model = mlp()
    X, y = make_data("ce")
    L = hesse.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), params=["4.weight"]).linearize()
    v = torch.ones(L.shape[0], dtype=torch.float64)
    L @ v
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="call linearize"):
        L @ v
