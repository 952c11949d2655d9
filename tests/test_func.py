"""hesse.func against torch.autograd.functional references in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse import NonFiniteError
from hesse.func import HVP_MODES
from hesse.func._tensor import FiniteDifferenceWarning


def rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def mixed(x):
    return torch.sin(x).prod() + (x**4).sum() * torch.exp(-(x.sum() ** 2) / 10)


FUNCTIONS = [rosen, mixed]


@pytest.mark.parametrize("f", FUNCTIONS)
@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_matches_dense_reference(f, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    x0, v0 = x.clone(), v.clone()
    H = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(hesse.hvp(f, x, v, mode=mode), H @ v, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, x0) and torch.equal(v, v0)


def test_hvp_on_a_matrix_point_keeps_shape():
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)

    def f(x):
        return (x.sin() ** 2).sum() + (x @ x.T).trace() ** 2

    H = torch.autograd.functional.hessian(f, x).reshape(12, 12)
    out = hesse.hvp(f, x, v)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), H @ v.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f", FUNCTIONS)
def test_hessian_and_linearized_hvp(f):
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    H = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(hesse.hessian(f, x), H, rtol=1e-12, atol=1e-12)
    hv = hesse.linearize_hvp(f, x)
    V = torch.randn(4, 5, dtype=torch.float64)
    for v in V:
        torch.testing.assert_close(hv(v), H @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv(V), V @ H, rtol=1e-12, atol=1e-12)  # a batch (k, *x.shape)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_fd_hvp_accuracy_follows_dtype(dtype, rtol):
    x = torch.tensor([0.3, -0.7, 1.1, 0.5], dtype=dtype)
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=dtype)
    exact = torch.autograd.functional.hessian(mixed, x.double()) @ v.double()
    got = hesse.fd_hvp(mixed, x, v)
    assert got.dtype == dtype
    err = float((got.double() - exact).norm() / exact.norm())
    assert err < rtol
    # a far too small step is worse in float32: the default step is chosen on purpose
    if dtype == torch.float32:
        with pytest.warns(FiniteDifferenceWarning, match="rounding"):
            bad = hesse.fd_hvp(mixed, x, v, h=1e-7)  # ... and its error is flagged
        assert float((bad.double() - exact).norm() / exact.norm()) > 10 * err


def test_fd_hvp_works_without_double_backward():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x**3).sum()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x.detach() ** 2  # detached: no second derivative

    x = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def g(x):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(OnceDifferentiable.apply(x), x)[0]

    torch.testing.assert_close(hesse.fd_hvp(None, x, v, grad_fn=g), 6 * x * v, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("loss_name", ["mse", "ce", "bce"])
def test_ggn_vp_of_a_function(loss_name):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4 * 3, 5, generator=g, dtype=torch.float64)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    v = torch.randn(5, generator=g, dtype=torch.float64)

    def out_fn(x):
        return torch.tanh(A @ x).reshape(4, 3)

    loss_fn = {"mse": nn.MSELoss(), "ce": nn.CrossEntropyLoss(), "bce": nn.BCEWithLogitsLoss()}[
        loss_name
    ]
    y = {
        "mse": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "ce": torch.tensor([0, 2, 1, 2]),
        "bce": torch.randint(0, 2, (4, 3), generator=g).double(),
    }[loss_name]
    J = torch.autograd.functional.jacobian(lambda x: out_fn(x).reshape(-1), x)
    o = out_fn(x).detach()
    Ho = torch.autograd.functional.hessian(lambda o_: loss_fn(o_.view(4, 3), y), o.reshape(-1))
    torch.testing.assert_close(
        hesse.ggn_vp(out_fn, loss_fn, x, v, y), J.T @ Ho @ J @ v, rtol=1e-12, atol=1e-12
    )
    V = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(
        hesse.ggn_vp(out_fn, loss_fn, x, V, y), V @ (J.T @ Ho @ J).T, rtol=1e-12, atol=1e-12
    )


def test_fisher_vp_empirical_is_outer_product_of_sample_gradients():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6 * 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])

    def out_fn(x):
        return torch.sin(A @ x).reshape(6, 3)

    grads = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda x, i=i: nn.functional.cross_entropy(out_fn(x)[i : i + 1], y[i : i + 1]), x
            )
            for i in range(6)
        ]
    )
    F = grads.T @ grads / 6
    torch.testing.assert_close(
        hesse.fisher_vp(out_fn, nn.CrossEntropyLoss(), x, v, y), F @ v, rtol=1e-12, atol=1e-12
    )


def test_func_errors_are_clear():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape of x \(3,\), got \(2,\)"):
        hesse.hvp(rosen, x, torch.zeros(2))
    with pytest.raises(TypeError, match="dtype and device of x"):
        hesse.hvp(rosen, x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):
        hesse.hvp(lambda x: x**2, x, torch.ones(3))
    with pytest.raises(TypeError, match="floating point"):
        hesse.hessian(rosen, torch.zeros(3, dtype=torch.long))
    with pytest.raises(NonFiniteError):
        hesse.hvp(rosen, torch.tensor([0.0, float("nan"), 1.0]), torch.ones(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        hesse.hvp(rosen, x, torch.ones(3), mode="fast")
    with pytest.raises(ValueError, match="positive step"):
        hesse.fd_hvp(rosen, x, torch.ones(3), h=0.0)


def test_non_finite_derivatives_are_reported():
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    v = torch.ones(2, dtype=torch.float64)

    def f(x):
        return (x.abs() ** 1.5).sum()  # second derivative infinite at 0

    for call in (
        lambda: hesse.hvp(f, x, v),
        lambda: hesse.hessian(f, x),
        lambda: hesse.linearize_hvp(f, x)(v),
    ):
        with pytest.raises(NonFiniteError, match="not finite"):
            call()
    with pytest.raises(NonFiniteError, match="not finite"):
        hesse.ggn_vp(
            lambda z: z.sqrt(),  # derivative NaN at -1
            nn.MSELoss(),
            torch.tensor([-1.0, 1.0]),
            torch.ones(2),
            targets=torch.zeros(2),
        )


def test_dense_hessian_through_layer_norm_matches_double_backward():
    """torch.func.hessian (jacfwd of jacrev) is wrong here in torch 2.13; hesse.hessian is
    checked against autograd's double backward, row by row."""
    A = torch.arange(1.0, 13.0).view(3, 4).double()

    def f(th):
        return (F.layer_norm(th[:4].expand(3, 4) * A, (4,), th[4:]) ** 3).sum()

    th = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = th.clone().requires_grad_()
    g = torch.autograd.grad(f(x), x, create_graph=True)[0]
    ref = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(8)])
    H = hesse.hessian(f, th)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-10)


def test_dense_products_through_a_graph_go_in_blocks_of_columns(monkeypatch):
    """flat_graph_hvp sends at most MAX_BATCHED_COLUMNS columns through the graph at once
    (a batched backward holds the graph once per column); the blocks make the same
    matrix."""
    from hesse.func import _engine

    def f(x):
        return (x.sin() * x.roll(1)).sum() + (x**4).sum()

    x = torch.linspace(-1, 1, 10, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    eye = torch.eye(10, dtype=torch.float64)
    whole = _engine.flat_graph_hvp(g, x, eye)
    calls = []
    batched = _engine.graph_hvp

    def counting(*args, **kw):
        calls.append(args[2][0].shape[0] if kw.get("batched") else 1)
        return batched(*args, **kw)

    monkeypatch.setattr(_engine, "MAX_BATCHED_COLUMNS", 4)
    monkeypatch.setattr(_engine, "graph_hvp", counting)
    blocks = _engine.flat_graph_hvp(g, x, eye)
    assert calls == [4, 4, 2]
    ref = torch.func.hessian(f)(x.detach())
    torch.testing.assert_close(whole, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocks, ref, rtol=1e-12, atol=1e-12)
