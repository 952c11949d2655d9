"""hesse.prune against references computed here, independently, in float64: brute-force
searches with least-squares refits, reconstruction errors from the layers' own forward
passes, and the special Hessians where OBS reduces to OBD and to magnitude pruning."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.compress import METHODS, default_layers, prune

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """``n`` samples of ``d`` correlated features (a random mixing of Gaussians)."""
    g = _gen(seed)
    return torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64)


def linear(W: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


def mse_fit(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares: the minimiser of mean((X w - y)^2)."""
    return torch.linalg.lstsq(X, y).solution


def refit_error(w: torch.Tensor, X: torch.Tensor, keep: list[int]) -> tuple[float, torch.Tensor]:
    """The least reconstruction error ||(w - v) X^T||^2 / N over v supported on ``keep``,
    and that v (by least squares on the layer's outputs)."""
    target = X @ w
    v = torch.zeros_like(w)
    if keep:
        v[keep] = mse_fit(X[:, keep], target[:, None])[:, 0]
    return float(((X @ (w - v)) ** 2).sum() / X.shape[0]), v


# -- the mathematics ---------------------------------------------------------------------


def test_global_obs_one_removal_is_the_best_refit():
    """At the least-squares optimum the loss is its own quadratic model: OBS's single
    removal must be the best of every removal followed by a least-squares refit."""
    n, d = 40, 6
    X = correlated(n, d, 0)
    y = torch.randn(n, 1, generator=_gen(1), dtype=F64)
    model = linear(mse_fit(X, y).T)
    before = float(F.mse_loss(model(X), y).detach())
    report = prune(model, nn.MSELoss(), (X, y), method="obs", sparsity=1 / d, damping=0.0)
    losses = []
    for q in range(d):
        keep = [j for j in range(d) if j != q]
        v = torch.zeros(d, dtype=F64)
        v[keep] = mse_fit(X[:, keep], y)[:, 0]
        losses.append((float(F.mse_loss(X @ v, y[:, 0])), q, v))
    best, q, v = min(losses)
    assert sorted(losses)[1][0] > best * (1 + 1e-6)  # the winner is unique
    mask = report.layers[""].mask[0]
    assert mask.tolist() == [j != q for j in range(d)]
    torch.testing.assert_close(model.weight[0].detach(), v)
    assert report.loss_after == pytest.approx(best, rel=1e-9)
    assert report.predicted == pytest.approx(best - before, rel=1e-7)
    assert report.layers[""].measured == pytest.approx(best - before, rel=1e-7)


@pytest.mark.parametrize("method", ["layer-obs", "sparsegpt"])
def test_layer_obs_one_removal_per_row_is_the_best_refit(method):
    """One removal per row: ExactOBS picks, in each row, the weight whose removal and
    refit costs least; SparseGPT only compensates to the right, so only its last column
    is exact, and here it must not beat ExactOBS."""
    n, d, rows = 30, 5, 4
    X = correlated(n, d, 2)
    W = torch.randn(rows, d, generator=_gen(3), dtype=F64)
    model = linear(W)
    report = prune(
        model, nn.MSELoss(), (X, torch.zeros(n, rows, dtype=F64)),
        method=method, sparsity=1 / d, damping=0.0, allocation="row",
    )  # fmt: skip
    best_total = 0.0
    for r in range(rows):
        errors = [(refit_error(W[r], X, [j for j in range(d) if j != q]), q) for q in range(d)]
        (best, v), q = min(errors, key=lambda e: e[0][0])
        best_total += best
        if method == "layer-obs":
            assert report.layers[""].mask[r].tolist() == [j != q for j in range(d)]
            torch.testing.assert_close(model.weight[r].detach(), v)
    layer = report.layers[""]
    if method == "layer-obs":
        assert layer.predicted == pytest.approx(best_total, rel=1e-9)
    else:
        assert layer.predicted > best_total * (1 + 1e-9)
    assert layer.measured == pytest.approx(layer.predicted, rel=1e-9)


def test_greedy_exact_obs_is_greedy_exhaustive_refit():
    """Several removals: ExactOBS equals removing, at each step, the weight whose removal
    and least-squares refit of the rest of the row costs least."""
    n, d, rows, k = 25, 6, 3, 3
    X = correlated(n, d, 4)
    W = torch.randn(rows, d, generator=_gen(5), dtype=F64)
    model = linear(W)
    report = prune(
        model, nn.MSELoss(), (X, torch.zeros(n, rows, dtype=F64)),
        method="layer-obs", sparsity=k / d, damping=0.0, allocation="row",
    )  # fmt: skip
    total = 0.0
    for r in range(rows):
        keep = list(range(d))
        for _ in range(k):
            errors = [(refit_error(W[r], X, [j for j in keep if j != q]), q) for q in keep]
            (error, v), q = min(errors, key=lambda e: e[0][0])
            keep.remove(q)
        total += error
        assert report.layers[""].mask[r].tolist() == [j in keep for j in range(d)]
        torch.testing.assert_close(model.weight[r].detach(), v)
    assert report.layers[""].predicted == pytest.approx(total, rel=1e-9)


def greedy_refit_trace(w: torch.Tensor, X: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """Greedy exhaustive refit of one row to the end: for c = 0..d removals, the
    reconstruction error and the refitted row."""
    keep = list(range(w.numel()))
    trace = [(0.0, w.clone())]
    while keep:
        errors = [(refit_error(w, X, [j for j in keep if j != q]), q) for q in keep]
        (error, v), q = min(errors, key=lambda e: e[0][0])
        keep.remove(q)
        trace.append((error, v))
    return trace


@pytest.mark.parametrize("seed", [0, 9])
def test_layer_allocation_is_the_best_spread_of_the_greedy_traces(seed):
    """allocation='layer' (OBC): the layer's removals spread over the rows. Reference: each
    row's greedy exhaustive-refit trace F_r(c), and a brute-force search over every count
    vector with the layer's total for the least sum of F_r(c_r). A row of small weights
    makes uneven counts win: the same count in every row must cost clearly more. Seed 9
    has non-convex traces, where OBC's sorting of the raw step costs would lose 55 %."""
    n, d, rows, k = 30, 4, 3, 6
    X = correlated(n, d, 40 + seed)
    W = torch.randn(rows, d, generator=_gen(41 + seed), dtype=F64)
    W[1] *= 0.1
    data = (X, torch.zeros(n, rows, dtype=F64))
    traces = [greedy_refit_trace(W[r], X) for r in range(rows)]
    totals = sorted(
        (sum(traces[r][c][0] for r, c in enumerate(cs)), cs)
        for cs in itertools.product(range(d + 1), repeat=rows)
        if sum(cs) == k
    )
    (best, counts), second = totals[0], totals[1][0]
    assert second > best * (1 + 1e-6)  # the winner is unique
    assert len(set(counts)) > 1  # and uneven
    model = linear(W)
    layer = prune(model, nn.MSELoss(), data, method="layer-obs", sparsity=k / (rows * d),
                  damping=0.0).layers[""]  # fmt: skip
    assert layer.measured == pytest.approx(best, rel=1e-9)
    assert layer.predicted == pytest.approx(best, rel=1e-9)
    assert (~layer.mask).sum(1).tolist() == list(counts)
    for r, c in enumerate(counts):
        torch.testing.assert_close(model.weight[r].detach(), traces[r][c][1])
    uniform = prune(linear(W), nn.MSELoss(), data, method="layer-obs", sparsity=k / (rows * d),
                    damping=0.0, allocation="row").layers[""]  # fmt: skip
    assert uniform.measured == pytest.approx(sum(t[k // rows][0] for t in traces), rel=1e-9)
    assert layer.measured < 0.8 * uniform.measured


@pytest.mark.parametrize("exact", [True, False])
def test_allocate_is_the_brute_force_optimum(exact, monkeypatch):
    """The counts against a brute-force search over every count vector: exact (dynamic
    programme) for any traces, and for convex traces by hull prices too; a non-convex
    row (an expensive first removal, then cheap ones) the programme judges right, where
    sorting the raw step costs (OBC) would take the cheap ones without the first."""
    from hesse.compress import _obs

    if not exact:
        monkeypatch.setattr(_obs, "ALLOCATE_MAX_ENTRIES", 0)
    g = _gen(42)
    for convex in (True, False):
        steps = torch.rand(4, 5, generator=g, dtype=F64)
        if convex:
            steps = steps.cumsum(1)
        elif not exact:
            continue
        F = torch.cat([torch.zeros(4, 1, dtype=F64), steps.cumsum(1)], 1)
        for k in (0, 3, 7, 12, 20):
            best = min(
                float(sum(F[r, c] for r, c in enumerate(cs)))
                for cs in itertools.product(range(6), repeat=4)
                if sum(cs) == k
            )
            counts = _obs.allocate(F, k)
            assert int(counts.sum()) == k
            assert float(F.gather(1, counts[:, None]).sum()) == pytest.approx(best, rel=1e-12)
    # row 0 steps 1.0, 0.05, 0.05; row 1 steps 0.3, 0.35, 2.0: three removals cost 1.1 as
    # (3, 0); the raw step costs' three cheapest give (2, 1), 1.35; hull prices (1, 2), 1.65
    F = torch.tensor([[0, 1.0, 1.05, 1.1], [0, 0.3, 0.65, 2.65]], dtype=F64)
    assert _obs.allocate(F, 3).tolist() == ([3, 0] if exact else [1, 2])
    assert _obs.allocate(F, 2).tolist() == [0, 2]  # 0.65 against 1.05 or 1.3


def _conv1d(W: torch.Tensor) -> nn.Module:
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = Conv1D(W.shape[0], W.shape[1]).double()
    with torch.no_grad():
        layer.weight.copy_(W.T)  # Conv1D stores (inputs, outputs)
    return layer


def _error_conv(model, old_weight, x):
    """||(W - W') X||^2 / N from the layer's own forward pass (its bias cancels)."""
    with torch.no_grad():
        new = model(x)
        saved = model.weight.detach().clone()
        model.weight.copy_(old_weight)
        old = model(x)
        model.weight.copy_(saved)
    if isinstance(model, nn.Conv2d):  # N = samples x output positions
        return float(((new - old) ** 2).sum() / (new.shape[0] * new.shape[2] * new.shape[3]))
    return float(((new - old) ** 2).sum() / new.reshape(-1, new.shape[-1]).shape[0])


@pytest.mark.parametrize("method", ["layer-obs", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_predicted_is_the_reconstruction_error(method, kind):
    """With H = 2 X X^T / N and no damping, the costs of the removals add up to the
    layer's reconstruction error ||(W - W') X||^2 / N, which the layer's forward pass
    measures here (a factor 2 or a transposed layout would show)."""
    g = _gen(6)
    if kind == "conv2d":
        torch.manual_seed(0)
        model = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect").double()
        x = torch.randn(6, 2, 7, 7, generator=g, dtype=F64)
        y = torch.zeros(6, 3, 4, 4, dtype=F64)
    else:
        W = torch.randn(5, 8, generator=g, dtype=F64)
        model = linear(W, bias=True) if kind == "linear" else _conv1d(W)
        x = torch.randn(3, 10, 8, generator=g, dtype=F64)  # a batch of sequences
        y = torch.zeros(3, 10, 5, dtype=F64)
    old = model.weight.detach().clone()
    report = prune(model, nn.MSELoss(), (x, y), method=method, sparsity=0.5, damping=0.0)
    layer = report.layers[""]
    error = _error_conv(model, old, x)
    assert error > 0
    assert layer.measured == pytest.approx(error, rel=1e-9)
    if method == "magnitude":
        assert layer.predicted is None
        kept = old.abs()[layer.mask].min()
        assert kept >= old.abs()[~layer.mask].max()
    else:
        assert layer.predicted == pytest.approx(error, rel=1e-9)


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_layers_see_the_pruned_inputs(sequential):
    """With sequential=True the second layer is fitted to the inputs the pruned first layer
    gives it; with False, to the dense model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    dense = copy.deepcopy(model)
    X = correlated(40, 6, 21)
    r = prune(
        model, nn.MSELoss(), (X, torch.zeros(40, 3, dtype=F64)), damping=0.0, sequential=sequential
    )
    with torch.no_grad():
        inputs = torch.tanh((model if sequential else dense)[0](X))
        D = model[2].weight - dense[2].weight
    error = float(((inputs @ D.T) ** 2).sum() / 40)
    assert r.layers["2"].measured == pytest.approx(error, rel=1e-9)
    assert r.layers["2"].predicted == pytest.approx(error, rel=1e-9)


def test_conv1d_is_a_transposed_linear():
    """transformers' Conv1D stores W^T: pruning it equals pruning the Linear that stores W."""
    W = torch.randn(4, 8, generator=_gen(7), dtype=F64)
    x = torch.randn(20, 8, generator=_gen(8), dtype=F64)
    data = (x, torch.zeros(20, 4, dtype=F64))
    a, b = linear(W, bias=True), _conv1d(W)
    ra = prune(a, nn.MSELoss(), data, method="sparsegpt", pattern="2:4", blocksize=4)
    rb = prune(b, nn.MSELoss(), data, method="sparsegpt", pattern="2:4", blocksize=4)
    torch.testing.assert_close(a.weight.detach(), b.weight.detach().T)
    assert torch.equal(ra.layers[""].mask, rb.layers[""].mask.T)


def _orthogonal_design(scales: list[float], n: int = 30) -> torch.Tensor:
    """X with orthogonal columns of the given norms / sqrt(n): X^T X / n = diag(scales^2)."""
    Q = torch.linalg.qr(torch.randn(n, len(scales), generator=_gen(9), dtype=F64)).Q
    return Q * torch.tensor(scales, dtype=F64) * math.sqrt(n)


@pytest.mark.parametrize("identity", [False, True])
def test_obs_reduces_to_obd_and_magnitude(identity):
    """A diagonal Hessian: OBS (global and layer-wise) removes what OBD removes and moves
    nothing else; a multiple of the identity: what magnitude pruning removes."""
    w = torch.tensor([[0.9, -0.2, 0.5, 1.4, -0.7, 0.3]], dtype=F64)
    scales = [1.0] * 6 if identity else [0.3, 2.0, 0.6, 0.2, 1.5, 3.0]
    X = _orthogonal_design(scales)
    data = (X, X @ w.T + 0.1 * torch.randn(X.shape[0], 1, generator=_gen(10), dtype=F64))
    masks = {}
    for method in ("magnitude", "obd", "obs", "layer-obs", "sparsegpt"):
        model = linear(w)
        r = prune(model, nn.MSELoss(), data, method=method, sparsity=0.5, damping=0.0)
        masks[method] = r.layers[""].mask
        kept = masks[method]
        torch.testing.assert_close(model.weight[kept], w[kept])  # no compensation
    assert torch.equal(masks["obs"], masks["obd"])
    assert torch.equal(masks["layer-obs"], masks["obd"])
    assert torch.equal(masks["sparsegpt"], masks["obd"])
    assert torch.equal(masks["obd"], masks["magnitude"]) == identity


def test_sparsegpt_lies_between_exact_obs_and_magnitude():
    """On equal terms (the same count in every row: a 2:4 pattern), the reconstruction
    error of SparseGPT lies between ExactOBS's and magnitude pruning's."""
    for seed in range(4):
        X = correlated(64, 16, 20 + seed)
        W = torch.randn(8, 16, generator=_gen(30 + seed), dtype=F64)
        data = (X, torch.zeros(64, 8, dtype=F64))
        err = {}
        for method in ("layer-obs", "sparsegpt", "magnitude"):
            r = prune(linear(W), nn.MSELoss(), data, method=method, pattern="2:4", blocksize=8)
            err[method] = r.layers[""].measured
        assert err["layer-obs"] <= err["sparsegpt"] <= err["magnitude"], err
        assert err["layer-obs"] < 0.9 * err["magnitude"]


# -- contracts -------------------------------------------------------------------------------


def mlp_cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 2),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    g = _gen(11)
    return model, (
        torch.randn(32, 1, 6, 6, generator=g, dtype=F64),
        torch.randint(0, 3, (32,), generator=g),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_nm_pattern_holds_in_every_group(method, pattern):
    n, m = map(int, pattern.split(":"))
    model, data = mlp_cnn()
    report = prune(model, nn.CrossEntropyLoss(), data, method=method, pattern=pattern)
    assert list(report.layers) == ["0", "3", "6", "8"]
    modules = dict(model.named_modules())
    for name, layer in report.layers.items():
        weight = modules[name].weight.detach()
        kept = layer.mask.reshape(weight.shape[0], -1, m).sum(-1)
        assert (kept == n).all(), name
        assert (weight[~layer.mask] == 0).all()
        assert layer.sparsity == pytest.approx(1 - n / m)
    assert math.isfinite(report.loss_after)


def test_obd_takes_a_precomputed_diagonal():
    """The diagonal computed once serves several sparsities: the same masks as computing it."""
    model, data = mlp_cnn()
    names = default_layers(model)
    weights = [model.get_submodule(n).weight for n in names]
    diag = hesse.diagonal(
        hesse.GGNOperator(model, nn.CrossEntropyLoss(), data, params=weights), "exact"
    )
    for s in (0.3, 0.6):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        ra = prune(a, nn.CrossEntropyLoss(), data, method="obd", sparsity=s)
        rb = prune(b, nn.CrossEntropyLoss(), data, method="obd", sparsity=s, diagonal=diag.estimate)
        assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in names)
    with pytest.raises(
        ValueError,
        match=r"diagonal must have shape \(\d+,\), one entry per pruned weight, got shape \(3,\)",
    ):
        prune(model, nn.CrossEntropyLoss(), data, method="obd", diagonal=torch.ones(3, dtype=F64))


class _ClassesFirst(nn.Module):
    """(N, T, C) outputs as (N, C, T), the layout CrossEntropyLoss takes."""

    def forward(self, x):
        return x.transpose(1, 2)


def _diagonal_cases():
    g = _gen(43)
    model, (x, y) = mlp_cnn()  # Conv2d, eval-mode BatchNorm, Linear
    yield "cnn, cross-entropy", model, nn.CrossEntropyLoss(), [(x[:20], y[:20]), (x[20:], y[20:])]
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xs = torch.randn(6, 7, 4, generator=g, dtype=F64)  # 7 positions per sample
    ys = torch.randn(6, 7, 3, generator=g, dtype=F64)
    yield "sequence, mse", seq, nn.MSELoss(), (xs, ys)
    yield "sequence, sum of squares", seq, nn.MSELoss(reduction="sum"), (xs, ys)
    labels = torch.randint(0, 3, (6, 7), generator=g)
    batches = [(xs[:4], labels[:4]), (xs[4:], labels[4:])]
    yield (
        "sequence, cross-entropy",
        nn.Sequential(seq, _ClassesFirst()),
        nn.CrossEntropyLoss(),
        batches,
    )
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2)).double()
    images = torch.randn(3, 2, 5, 5, generator=g, dtype=F64)
    yield (
        "images, bce",
        conv,
        nn.BCEWithLogitsLoss(),
        (images, torch.rand(3, 2, 4, 4, generator=g, dtype=F64)),
    )


@pytest.mark.parametrize("case", list(_diagonal_cases()), ids=lambda c: c[0])
def test_ggn_diagonal_by_backpropagated_columns_is_the_dense_ggns(case):
    """obd's exact diagonal, from one backward pass per column of the output Hessian's
    square root and output position, against the diagonal of the dense GGN (float64):
    several positions per sample (sequences, images), batches of unequal size."""
    from hesse.compress._diagonal import covered, ggn_diagonal
    from hesse.compress._layers import select_layers

    _, model, loss_fn, data = case
    layers = select_layers(model, None)
    assert covered(layers, loss_fn)
    ggn = hesse.GGNOperator(model, loss_fn, data, params=[la.weight for la in layers])
    expected = ggn.to_dense().diagonal()
    got = ggn_diagonal(model, loss_fn, data, layers)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    assert float(expected.max()) > 0


def test_obd_uses_the_backpropagated_diagonal_only_where_it_applies(monkeypatch):
    """diagonal='exact' on the GGN of covered layers takes the backpropagated diagonal;
    on the Fisher, the products (whose diagonal differs)."""
    from hesse.compress import _prune

    model, data = mlp_cnn()
    calls = []
    real = _prune.ggn_diagonal
    monkeypatch.setattr(_prune, "ggn_diagonal", lambda *a: calls.append(1) or real(*a))
    prune(copy.deepcopy(model), nn.CrossEntropyLoss(), data, method="obd")
    assert calls == [1]
    prune(copy.deepcopy(model), nn.CrossEntropyLoss(), data, method="obd", curvature="fisher")
    assert calls == [1]


@pytest.mark.parametrize("method", [*METHODS, "layer-obs by row"])
def test_the_requested_sparsity_is_reached(method):
    model, data = mlp_cnn()
    targets = {"0": 0.25, "6": 0.7, "8": 0.5}
    kw = {"allocation": "row"} if method == "layer-obs by row" else {}
    report = prune(
        model, nn.CrossEntropyLoss(), data, method=method.split()[0], sparsity=targets, **kw
    )
    assert list(report.layers) == list(targets)
    modules = dict(model.named_modules())
    for name, s in targets.items():
        layer = report.layers[name]
        weight = modules[name].weight.detach()
        rows, cols = weight.shape[0], weight[0].numel()
        per_row = method == "layer-obs by row"  # the same count in every row
        expected = (
            math.floor(s * cols + 0.5) / cols
            if per_row
            else math.floor(s * weight.numel() + 0.5) / weight.numel()
        )
        assert layer.sparsity == pytest.approx(expected)
        assert float((weight == 0).double().mean()) == pytest.approx(expected)
        if per_row:
            assert (layer.mask.reshape(rows, -1).sum(1) == cols - round(expected * cols)).all()
    assert (modules["3"].weight != 0).all()  # not named, not pruned


@pytest.mark.parametrize("method", ["magnitude", "layer-obs", "obs"])
def test_only_the_pruned_weights_change(method):
    model, data = mlp_cnn()
    before = copy.deepcopy(model)
    report = prune(model, nn.CrossEntropyLoss(), data, method=method, sparsity=0.5)
    assert not model.training
    names = {f"{n}.weight" for n in report.layers}
    for (name, a), b in zip(model.state_dict().items(), before.state_dict().values()):
        if name not in names:
            assert torch.equal(a, b), name  # biases, BatchNorm, buffers
    if method == "magnitude":  # removes, moves nothing
        for name, layer in report.layers.items():
            w, w0 = model.get_submodule(name).weight, before.get_submodule(name).weight
            assert torch.equal(w[layer.mask], w0[layer.mask])
    else:  # compensates
        w, w0 = model.get_submodule("6").weight, before.get_submodule("6").weight
        mask = report.layers["6"].mask
        assert not torch.allclose(w[mask], w0[mask])
    with torch.no_grad():
        loss_before = float(F.cross_entropy(before(data[0]), data[1]))
        loss_after = float(F.cross_entropy(model(data[0]), data[1]))
    assert report.loss_before == pytest.approx(loss_before, rel=1e-12)
    assert report.loss_after == pytest.approx(loss_after, rel=1e-12)


def test_obs_predicts_the_loss_increase_of_a_least_squares_layer_and_beats_obd():
    """A linear model at its least-squares optimum: the loss is quadratic, OBS's
    prediction is exact, and its loss is below OBD's and magnitude's."""
    X = correlated(50, 8, 12)
    y = X @ torch.randn(8, 2, generator=_gen(13), dtype=F64) + torch.randn(
        50, 2, generator=_gen(14), dtype=F64
    )
    losses = {}
    for method in ("obs", "obd", "magnitude"):
        model = linear(mse_fit(X, y).T)
        r = prune(model, nn.MSELoss(), (X, y), method=method, sparsity=0.5, damping=0.0)
        losses[method] = r.loss_after
        if method != "magnitude":
            assert r.loss_after - r.loss_before > 0
            if method == "obs":
                assert r.predicted == pytest.approx(r.loss_after - r.loss_before, rel=1e-8)
        if method == "obd":  # saliency (1/2) H_qq w_q^2, H the GGN of the mean over 2 outputs
            H_diag = (2 / (50 * 2)) * (X * X).sum(0)
            w0 = mse_fit(X, y).T
            removed = ~r.layers[""].mask
            expected = float((H_diag * w0**2 / 2)[removed].sum())
            assert r.predicted == pytest.approx(expected, rel=1e-9)
    assert losses["obs"] < losses["obd"] <= losses["magnitude"] * (1 + 1e-12)


@pytest.mark.parametrize("method", ["layer-obs", "sparsegpt"])
def test_damping_adds_its_share_to_the_prediction(method):
    """The damped model is (1/2) tr(D (H + lam I) D^T), lam = damping * mean(diag H):
    the prediction exceeds the measured error by lam/2 ||D||^2."""
    X = correlated(30, 8, 19)
    W = torch.randn(3, 8, generator=_gen(20), dtype=F64)
    model = linear(W)
    r = prune(model, nn.MSELoss(), (X, torch.zeros(30, 3, dtype=F64)), method=method, damping=0.1)
    lam = 0.1 * float((2 / 30 * (X * X).sum(0)).mean())
    D = model.weight.detach() - W
    error = float(((X @ D.T) ** 2).sum() / 30)
    assert r.layers[""].measured == pytest.approx(error, rel=1e-9)
    assert r.layers[""].predicted == pytest.approx(error + lam / 2 * float((D**2).sum()), rel=1e-9)


def test_masks_survive_fine_tuning():
    model, data = mlp_cnn()
    report = prune(model, nn.CrossEntropyLoss(), data, method="layer-obs", sparsity=0.6)
    loss_fn = nn.CrossEntropyLoss()

    def step(m, opt):
        opt.zero_grad()
        loss_fn(m(data[0]), data[1]).backward()
        opt.step()

    # re-applied after each step
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    step(plain, opt)
    assert (plain.get_submodule("6").weight == 0).sum() < (~report.layers["6"].mask).sum()
    report.reapply(plain)
    for name, mask in report.masks.items():
        weight = plain.get_submodule(name).weight
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()
    # registered as torch.nn.utils.prune masks: kept through the steps themselves
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    report.register(model)
    for _ in range(2):
        step(model, opt)
    for name, mask in report.masks.items():
        module = model.get_submodule(name)
        assert (module.weight[~mask] == 0).all()
        assert (module.weight[mask] != 0).all()
        assert not torch.equal(module.weight_orig[mask], plain.get_submodule(name).weight[mask])


# -- real models -----------------------------------------------------------------------------


def test_gpt2_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 20, (4, 8), generator=_gen(15))
    data = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]

    def loss_fn(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    wte = model.transformer.wte.weight.detach().clone()
    report = prune(model, loss_fn, data, method="sparsegpt", pattern="2:4")
    names = [
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sorted(report.layers) == sorted(names)  # lm_head (tied to wte) left out
    assert torch.equal(model.transformer.wte.weight, wte)
    for name in names:
        weight = model.get_submodule(name).weight  # (inputs, outputs): groups along dim 0
        groups = (weight.T != 0).reshape(weight.shape[1], -1, 4).sum(-1)
        assert (groups <= 2).all()
        assert report.layers[name].measured <= report.layers[name].predicted * (1 + 1e-9)
    assert math.isfinite(report.loss_after)


def test_transformer_encoder_linear_layers():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = (
        nn.Sequential(
            nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
            nn.Flatten(),
            nn.Linear(8 * 4, 3),
        )
        .double()
        .eval()
    )
    data = (
        torch.randn(10, 4, 8, generator=_gen(16), dtype=F64),
        torch.randint(0, 3, (10,), generator=_gen(17)),
    )
    report = prune(model, nn.CrossEntropyLoss(), data, sparsity=0.5)
    assert sorted(report.layers) == sorted(
        [f"0.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)] + ["2"]
    )  # out_proj, whose weight the attention reads directly, is left out
    assert all(r.sparsity == 0.5 for r in report.layers.values())
    with pytest.raises(ValueError, match="never called"):
        prune(model, nn.CrossEntropyLoss(), data, params=["0.layers.0.self_attn.out_proj"])


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"sparsity": 1.0},
            ValueError,
            r"sparsity must be a finite real number in \[0, 1\), got 1.0",
        ),
        ({"sparsity": -0.1}, ValueError, "sparsity must be"),
        ({"sparsity": float("nan")}, ValueError, "sparsity must be"),
        ({"sparsity": {"6": 1.5}}, ValueError, r"sparsity\['6'\] must be"),
        ({"sparsity": {"nope": 0.5}}, ValueError, "no module named 'nope'; prunable ones"),
        ({"sparsity": {"6": 0.5}, "params": ["6"]}, ValueError, "keys select the layers"),
        ({"pattern": "2-4"}, ValueError, "pattern must be a string 'N:M'.*got '2-4'"),
        ({"pattern": "4:2"}, ValueError, "0 < N < M"),
        ({"pattern": "0:4"}, ValueError, "0 < N < M"),
        ({"pattern": (2, 4)}, ValueError, "got \\(2, 4\\)"),
        (
            {"pattern": "2:4", "sparsity": 0.7},
            ValueError,
            "sparsity of 0.5, but the sparsity of layer '0' is 0.7",
        ),
        ({"pattern": "1:3"}, ValueError, "divisible by 3, but layer '0' has 4 inputs"),
        ({"method": "obc"}, ValueError, "method must be one of"),
        ({"allocation": "column"}, ValueError, "allocation must be one of"),
        ({"damping": -1.0}, ValueError, "damping must be"),
        ({"blocksize": 0}, ValueError, "blocksize must be a positive integer, got 0"),
        ({"sequential": "yes"}, TypeError, "sequential must be True or False"),
        ({"params": ["1"]}, TypeError, "layer '1' is a BatchNorm2d; hesse.prune prunes nn.Linear"),
        ({"params": ["fc"]}, ValueError, "no module named 'fc'"),
        ({"params": []}, ValueError, "params is empty"),
        ({"method": "obd", "curvature": "kfac"}, ValueError, "curvature must be one of"),
    ],
)
def test_bad_input_says_what_was_expected(kwargs, error, match):
    model, data = mlp_cnn()
    with pytest.raises(error, match=match):
        prune(model, nn.CrossEntropyLoss(), data, **kwargs)


def test_bad_models_and_data():
    model, data = mlp_cnn()
    with pytest.raises(ValueError, match="data is empty"):
        prune(model, nn.CrossEntropyLoss(), [])
    with torch.no_grad():
        model[6].weight[0, 0] = math.nan
    with pytest.raises(hesse.NonFiniteError, match="the weight of layer '6' must be finite"):
        prune(model, nn.CrossEntropyLoss(), data)
    model, data = mlp_cnn()
    bad = (data[0].clone(), data[1])
    bad[0][0, 0, 0, 0] = math.inf
    with pytest.raises(hesse.NonFiniteError, match="must be finite"):
        prune(model, nn.CrossEntropyLoss(), bad, method="layer-obs")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)).double()
    with pytest.raises(ValueError, match="grouped convolution"):
        prune(grouped, nn.MSELoss(), (torch.zeros(1, 2, 3, 3, dtype=F64),) * 2, params=["0"])
    with pytest.raises(ValueError, match="no layer hesse.prune can prune"):
        prune(grouped, nn.MSELoss(), (torch.zeros(1, 2, 3, 3, dtype=F64),) * 2)
    # a singular input Hessian without damping
    X = torch.randn(10, 3, generator=_gen(18), dtype=F64)
    X = torch.cat([X, X[:, :1]], 1)  # a repeated feature
    with pytest.raises(ValueError, match="not positive definite.*raise damping"):
        prune(
            linear(torch.ones(2, 4, dtype=F64)),
            nn.MSELoss(),
            (X, torch.zeros(10, 2, dtype=F64)),
            damping=0.0,
        )
    big = nn.Linear(80, 80).double()
    with pytest.raises(ValueError, match="OBS_MAX_PARAMS = 5,000.*6,400"):
        prune(big, nn.MSELoss(), (torch.zeros(2, 80, dtype=F64),) * 2, method="obs")


# -- the command ------------------------------------------------------------------------------


USER_FILE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
loss_fn = nn.CrossEntropyLoss()
X = torch.randn(40, 4)
data = (X, (X[:, 0] > 0).long())
"""


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from hesse.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prunes_a_users_file_as_the_library_does(capsys, tmp_path):
    import json

    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    code, out, err = _cli(
        capsys,
        "prune",
        path,
        "--methods",
        "magnitude,layer-obs,obd",
        "--sparsities",
        "0.25,0.5",
        "--diagonal",
        "hutchinson",
        "--matvecs",
        "8",
        "--json",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    res = json.loads(out)
    assert (
        res["kind"] == "file"
        and [r["method"] for r in res["runs"]]
        == ["magnitude"] * 2 + ["layer-obs"] * 2 + ["obd"] * 2
    )
    ns: dict = {}
    exec(USER_FILE, ns)
    r = prune(ns["model"], ns["loss_fn"], ns["data"], method="layer-obs", sparsity=0.5)
    run = res["runs"][3]
    assert run["loss"] == pytest.approx(r.loss_after, rel=1e-6)
    assert res["dense"]["loss"] == pytest.approx(r.loss_before, rel=1e-6)
    assert run["reached"] == r.sparsity == 0.5
    exec(USER_FILE, ns)
    kw = {"diagonal": "hutchinson", "num_matvecs": 8, "seed": 0}
    r = prune(ns["model"], ns["loss_fn"], ns["data"], method="obd", sparsity=0.5, **kw)
    assert res["runs"][5]["loss"] == pytest.approx(r.loss_after, rel=1e-6)
    assert (tmp_path / "o" / "prune.json").exists() and (tmp_path / "o" / "prune.png").exists()


def test_cli_on_a_built_in_problem_and_its_errors(capsys):
    import json

    code, out, err = _cli(
        capsys,
        "prune",
        "logistic-digits",
        "--pattern",
        "2:4",
        "--train-steps",
        "30",
        "--methods",
        "magnitude,obd,sparsegpt",
        "--calibration",
        "200",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["metric"] == "accuracy" and 0.5 < res["dense"]["test_metric"] <= 1
    assert all(r["pattern"] == "2:4" and r["reached"] == 0.5 for r in res["runs"])
    for argv, message in [
        (["--methods", "obc"], "--methods must list methods among"),
        (["--sparsities", "0.5,1.2"], "--sparsities must be numbers in [0, 1)"),
        (["--pattern", "2:4", "--sparsities", "0.5"], "drop --sparsities"),
        (["--calibration", "-1"], "argument --calibration: expected an integer in [0, "),
        (["--matvecs", "0"], "argument --matvecs: expected an integer in [1, "),
        (["--damping", "nan"], "argument --damping: expected a finite number >= 0"),
    ]:
        code, _, err = _cli(capsys, "prune", "logistic-digits", *argv)
        assert code == 2 and message in err, err
    code, _, err = _cli(capsys, "prune", "rosenbrock")
    assert code == 2 and "neither a built-in data problem" in err


def test_cli_layers_choose_what_is_pruned(capsys, tmp_path):
    """--layers NAMES prunes those layers only, as params=NAMES does in the library (obd's
    exact diagonal included); a bad name or an unsupported layer is a usage error."""
    import json

    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    argv = ["prune", path, "--methods", "layer-obs,obd", "--sparsities", "0.5", "--json"]
    code, out, err = _cli(capsys, *argv, "--layers", "2")
    assert code == 0, err
    res = json.loads(out)
    assert res["layers"] == ["2"] and res["skipped_layers"] == []
    for run, method in zip(res["runs"], ["layer-obs", "obd"]):
        assert [la["name"] for la in run["layers"]] == ["2"]
        ns: dict = {}
        exec(USER_FILE, ns)
        r = prune(ns["model"], ns["loss_fn"], ns["data"], method=method, sparsity=0.5, params=["2"])
        assert run["loss"] == pytest.approx(r.loss_after, rel=1e-6)
        assert (ns["model"][0].weight != 0).all()
    for layers, message in [
        ("nope", "--layers: the model has no module named 'nope'"),
        ("1", "--layers: layer '1' is a Tanh"),
        (" , ", "--layers must name at least one module"),
    ]:
        code, _, err = _cli(capsys, *argv, "--layers", layers)
        assert code == 2 and message in err, err


def test_cli_pattern_skips_the_default_layers_it_does_not_fit(capsys):
    """cnn-digits' first convolution has 9 inputs per output: with the default layers a
    2:4 pattern leaves it dense, says so in the JSON and the table, and prunes the rest;
    named in --layers it is an error."""
    import json

    argv = ["prune", "cnn-digits", "--pattern", "2:4", "--train-steps", "3", "--calibration", "64"]
    argv += ["--methods", "magnitude,layer-obs"]
    code, out, err = _cli(capsys, *argv, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["layers"] == ["2", "5"]
    assert res["skipped_layers"] == [
        {
            "name": "0",
            "inputs": 9,
            "reason": "pattern 2:4: 9 inputs per output, not a multiple of 4",
        }
    ]
    for run in res["runs"]:
        assert [la["name"] for la in run["layers"]] == ["2", "5"]
        assert all(la["sparsity"] == 0.5 for la in run["layers"])
    code, out, err = _cli(capsys, *argv[:-2], "--methods", "magnitude")
    assert code == 0, err
    assert "Layers left dense" in out and "note: layer '0' left dense" in out
    code, _, err = _cli(capsys, *argv, "--layers", "0,2")
    assert code == 2
    assert (
        "--pattern 2:4 needs inputs per output divisible by 4, but layer '0' of --layers has 9"
        in err
    )
    code, _, err = _cli(capsys, "prune", "cnn-digits", "--pattern", "2-4")
    assert code == 2 and "--pattern: pattern must be a string 'N:M'" in err
