"""The warm start of minimize(FiniteSum, "subsampled-newton") on growing samples: the
sampling noise it measures (against per-sample gradients and its expectation over many
draws), the objective on a sample (mean and sum), and runs that still end at the full
data's minimiser (scikit-learn's), count only evaluations over all the data in ``nfev``,
and start from ``x0`` where a relative test needs its gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hesse import FiniteSum, OptimizeWarning, minimize
from hesse._minimize._growing_sample import SampleSum, first_sample
from hesse.problems import synthetic_logistic

pytest.importorskip("sklearn.linear_model")
from conftest import sklearn_logistic as _sklearn_logistic

D = torch.float64
TIGHT = {"gtol": 1e-13, "ftol": 0.0, "xtol": 0.0}


def _data(n=4000, d=4, seed=0):
    X, y = synthetic_logistic(n, d, seed=seed).train
    return X, y[:, 0].contiguous()


def _per_sample_grads(X, y, x):
    """Brute force: the gradient of each sample's BCE at ``x = [w; b]``."""
    r = torch.sigmoid(X @ x[:-1] + x[-1]) - y
    return torch.cat([X * r[:, None], r[:, None]], 1)


def _bce(x, batch):
    Xb, yb = batch
    return nn.functional.binary_cross_entropy_with_logits(Xb @ x[:-1] + x[-1], yb)


def _bce_sum(x, batch):
    Xb, yb = batch
    z = Xb @ x[:-1] + x[-1]
    return nn.functional.binary_cross_entropy_with_logits(z, yb, reduction="sum")


def _eval(sample, x):
    value, g, _ = sample._value_and_grad(x, x.shape)
    return float(value), g


# ------------------------------------------------------------ the sampling noise
def test_noise_is_half_the_spread_of_the_halves_means():
    """Against the per-sample gradients of the two halves: 0.5 |mean_A - mean_B| times
    sqrt(1 - m/n); the gradient is the whole sample's mean plus the regulariser's."""
    X, y = _data()
    l2 = 1e-2
    fs = FiniteSum(_bce, (X, y), regularizer=lambda x: 0.5 * l2 * (x[:-1] ** 2).sum())
    x = torch.linspace(-0.5, 0.5, 5, dtype=D)
    idx = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:600]
    sample = SampleSum(fs, idx)
    f, g = _eval(sample, x)
    G = _per_sample_grads(X[idx], y[idx], x)
    reg = torch.cat([l2 * x[:-1], torch.zeros(1, dtype=D)])
    torch.testing.assert_close(g, G.mean(0) + reg, rtol=1e-12, atol=1e-14)
    want = 0.5 * float((G[:300].mean(0) - G[300:].mean(0)).norm()) * math.sqrt(1 - 600 / 4000)
    assert sample.noise == pytest.approx(want, rel=1e-10)
    assert f == pytest.approx(float(fs.batch_value(x, (X[idx], y[idx]))), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_size", [None, 37])
@pytest.mark.parametrize("as_dict", [False, True])
def test_noise_with_odd_samples_chunks_dicts_and_sums(reduction, batch_size, as_dict):
    """m = 601 (halves of 300 and 301: each half's mean, not its sum times 2), evaluated in
    chunks of 37, data as a dict, a sum scaled by n/m, and a regulariser."""
    X, y = _data()
    n, m = 4000, 601

    def loss(x, batch):
        Xb, yb = (batch["X"], batch["y"]) if as_dict else batch
        return (_bce if reduction == "mean" else _bce_sum)(x, (Xb, yb))

    data = {"X": X, "y": y} if as_dict else (X, y)
    reg = lambda x: 0.01 * (x**2).sum()  # noqa: E731
    fs = FiniteSum(loss, data, regularizer=reg, reduction=reduction, batch_size=batch_size)
    x = torch.linspace(-0.5, 0.5, 5, dtype=D)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:m]
    sample = SampleSum(fs, idx)
    f, g = _eval(sample, x)
    G = _per_sample_grads(X[idx], y[idx], x)
    scale = 1.0 if reduction == "mean" else float(n)  # the sum's estimate is n times the mean
    torch.testing.assert_close(g, scale * G.mean(0) + 0.02 * x, rtol=1e-11, atol=1e-12)
    spread = (G[:300].mean(0) - G[300:].mean(0)).norm()
    want = 0.5 * scale * float(spread) * math.sqrt(1 - m / n)
    assert sample.noise == pytest.approx(want, rel=1e-10)
    value = float(_bce(x, (X[idx], y[idx])))
    assert f == pytest.approx(scale * value + float(reg(x)), rel=1e-12)


@pytest.mark.parametrize("closed_form", [False, True])
def test_a_sum_samples_hessian_on_a_subsample_estimates_the_whole(closed_form):
    """Inside a phase of m samples, the curvature on k of them with the loop's scale m/k is
    (n/k) times their summed Hessian, from a closed-form hessian= as from autograd."""
    X, y = _data()
    x = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.1], dtype=D)

    def closed(x, batch):  # the Hessian of the summed BCE of a linear model with intercept
        Xb, _ = batch
        A = torch.cat([Xb, torch.ones(len(Xb), 1, dtype=D)], 1)
        s = torch.sigmoid(A @ x)
        return A.T @ (A * (s * (1 - s))[:, None])

    fs = FiniteSum(_bce_sum, (X, y), reduction="sum", hessian=closed if closed_form else None)
    idx = torch.arange(0, 4000, 5)  # m = 800 of n = 4000
    sample = SampleSum(fs, idx)
    j = torch.arange(0, 800, 4)  # k = 200 of them
    H = sample._dense_hessian(x, x.shape, sample.subsample(j), 800 / 200)
    rows = idx[j]
    ref = (4000 / 200) * torch.func.hessian(lambda z: _bce_sum(z, (X[rows], y[rows])))(x)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-10)


def test_a_tensor_passed_as_it_is_is_never_subsampled():
    """data's tensors with another first dimension than n are passed whole, even where it
    equals a phase's sample (m = 110 for P = 11) or one of its halves (55)."""
    fs, _, _ = _tall_logistic(n=4000)
    X, y = fs.data
    E = torch.ones(110, 3, dtype=D)
    F = torch.ones(55, 2, dtype=D)
    seen = set()

    def loss(x, batch):
        Xb, yb, Eb, Fb = batch
        seen.add(len(Xb))
        assert Eb.shape == (110, 3) and Fb.shape == (55, 2)
        return _bce(x, (Xb, yb))

    fs2 = FiniteSum(loss, (X, y, E, F), regularizer=fs.regularizer)
    r = minimize(fs2, torch.zeros(11, dtype=D), "subsampled-newton", options={"gtol": 1e-8})
    assert r.success and 55 in seen


@pytest.mark.parametrize("m", [200, 2000])
def test_noise_squared_is_the_expected_sampling_error(m):
    """Over 400 draws without replacement, the mean of noise^2 equals the mean of
    |g_S - g|^2 (both estimate tr(Sigma) (1/m - 1/n)); with m = n/2 a dropped finite
    population correction would read 2x, a missing 1/2 4x."""
    X, y = _data()
    fs = FiniteSum(_bce, (X, y))
    x = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.1], dtype=D)
    G = _per_sample_grads(X, y, x)
    g = G.mean(0)
    gen = torch.Generator().manual_seed(2)
    noise2, err2 = [], []
    for _ in range(400):
        idx = torch.randperm(4000, generator=gen)[:m]
        sample = SampleSum(fs, idx)
        _, gs = _eval(sample, x)
        noise2.append(sample.noise**2)
        err2.append(float((gs - g).norm()) ** 2)
    exact = float(((G - g) ** 2).sum(1).sum()) / (4000 - 1) * (1 / m - 1 / 4000)
    assert sum(err2) / 400 == pytest.approx(exact, rel=0.15)
    assert sum(noise2) / 400 == pytest.approx(exact, rel=0.15)


def test_a_sum_is_scaled_to_the_whole_data():
    """reduction="sum": the sample's sum times n/m, an estimate of the full sum; its
    dense Hessian (closed form or autograd) is scaled alike."""
    X, y = _data()
    fs = FiniteSum(_bce_sum, (X, y), reduction="sum")
    x = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.1], dtype=D)
    idx = torch.arange(0, 4000, 8)
    sample = SampleSum(fs, idx)
    f, g = _eval(sample, x)
    G = _per_sample_grads(X[idx], y[idx], x)
    assert f == pytest.approx(8 * float(_bce_sum(x, (X[idx], y[idx]))), rel=1e-12)
    torch.testing.assert_close(g, 8 * G.sum(0), rtol=1e-12, atol=1e-12)
    want = 0.5 * 4000 * float((G[:250].mean(0) - G[250:].mean(0)).norm()) * math.sqrt(1 - 1 / 8)
    assert sample.noise == pytest.approx(want, rel=1e-10)
    H = sample._dense_hessian(x, x.shape)
    ref = 8 * torch.func.hessian(lambda z: _bce_sum(z, (X[idx], y[idx])))(x)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- the runs
def _tall_logistic(n=20000, d=10, reduction="mean"):
    X, y = _data(n, d, seed=3)
    l2 = 1.0 / n
    loss = _bce if reduction == "mean" else _bce_sum
    scale = 1.0 if reduction == "mean" else n
    fs = FiniteSum(
        loss, (X, y), regularizer=lambda x: scale * 0.5 * l2 * (x[:-1] ** 2).sum(),
        reduction=reduction,
    )  # fmt: skip
    return fs, X, y[:, None]


class _Counting:
    """A loss that counts its calls on all the data and on fewer samples."""

    def __init__(self, loss, n):
        self.loss, self.n, self.full, self.part = loss, n, 0, 0

    def __call__(self, x, batch):
        if len(batch[0]) == self.n:
            self.full += 1
        else:
            self.part += 1
        return self.loss(x, batch)


@pytest.mark.parametrize("gradient_sample", ["auto", 300, 0.05])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_phases_end_at_the_full_data_minimiser(gradient_sample, reduction):
    fs, X, y = _tall_logistic(reduction=reduction)
    counting = _Counting(fs.loss, fs.samples)
    fs = FiniteSum(counting, fs.data, regularizer=fs.regularizer, reduction=reduction)
    x0 = torch.zeros(11, dtype=D)
    opts = {**TIGHT, "gtol": 1e-13 * (fs.samples if reduction == "sum" else 1)}
    # no dense Hessian over all the data (the saddle check's, the curvature's cap)
    opts.update(saddle_check=False, subsample_max=0.5)
    r = minimize(fs, x0, "subsampled-newton", options={**opts, "gradient_sample": gradient_sample})
    assert r.success, r.message
    assert float((r.x - _sklearn_logistic(X, y)).norm() / r.x.norm()) <= 1e-8
    assert counting.part > 0  # the phases ran ...
    assert r.nfev == counting.full  # ... and nfev counts the evaluations over all the data


def test_phases_save_evaluations_over_all_the_data():
    """The point of the phases, on a tall problem: fewer evaluations over all the data
    (9 without them, 6 with, from this seed) for the same test."""
    fs, _, _ = _tall_logistic(n=40000)
    x0 = torch.zeros(11, dtype=D)
    runs = {
        gs: minimize(fs, x0, "subsampled-newton", options={**TIGHT, "gradient_sample": gs})
        for gs in (None, "auto")
    }
    assert all(r.success for r in runs.values())
    assert runs["auto"].nfev + 2 <= runs[None].nfev
    torch.testing.assert_close(runs["auto"].x, runs[None].x, rtol=1e-9, atol=1e-12)


def test_a_relative_test_starts_from_x0():
    """grad_rtol is relative to the gradient at x0 over all the data: x0 is evaluated
    first, and a start that already passes stays, with no phase run."""
    fs, _, _ = _tall_logistic()
    x0 = torch.zeros(11, dtype=D)
    opts = {"gtol": 0.0, "grad_rtol": 1e-8, "norm": 2}
    r = minimize(fs, x0, "subsampled-newton", options=opts)
    assert r.success
    g0 = torch.func.grad(fs)(x0).norm()
    assert float(torch.func.grad(fs)(r.x).norm()) <= 1e-8 * float(g0)
    again_opts = {**opts, "gtol": 1e-6, "saddle_check": False}
    again = minimize(fs, r.x, "subsampled-newton", options=again_opts)
    assert again.nit == 0 and again.nfev == 1 and torch.equal(again.x, r.x)


def test_the_same_seed_draws_the_same_samples():
    fs, _, _ = _tall_logistic()
    x0 = torch.zeros(11, dtype=D)
    opts = {"gtol": 1e-6, "gradient_sample": 200}
    a = minimize(fs, x0, "subsampled-newton", max_iter=2, options=opts)
    b = minimize(fs, x0, "subsampled-newton", max_iter=2, options=opts)
    c = minimize(fs, x0, "subsampled-newton", max_iter=2, options={**opts, "seed": 1})
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


def test_a_start_not_finite_on_the_sample_is_reported_at_x0():
    X, y = _data(2000)

    def loss(x, batch):
        return _bce(x, batch) + torch.log(x[0])  # log(0) at x0

    fs = FiniteSum(loss, (X, y))
    r = minimize(fs, torch.zeros(5, dtype=D), "subsampled-newton")
    assert r.status == "non_finite" and "fun(x0)" in r.message


def test_first_sample_sizes():
    assert first_sample("auto", 200000, 101) == 1010
    assert first_sample("auto", 2019, 101) is None  # the first phase would be over half
    assert first_sample(300, 600, 5) == 300 and first_sample(301, 600, 5) is None
    assert first_sample(0.01, 200000, 101) == 2000
    assert first_sample(None, 10**6, 5) is None


@pytest.mark.parametrize("bad", [1, 0, -3, 0.0, 0.6, 1.0, "all", True, float("nan")])
def test_bad_gradient_sample_raises(bad):
    fs, _, _ = _tall_logistic(n=1000)
    with pytest.raises(ValueError, match="gradient_sample"):
        opts = {"gradient_sample": bad}
        minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)


def test_a_network_reaches_a_minimum_through_the_phases():
    """A non-convex FiniteSum (an MLP's cross-entropy, exact subsampled Hessians that may
    be indefinite): the phases ran, and the run ends where the full gradient is small and
    the full Hessian (torch.func, float64) is positive semi-definite."""
    torch.manual_seed(0)
    X = torch.randn(3000, 3, dtype=D)
    y = (X[:, 0] * X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(w, batch):
        params = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        out = torch.func.functional_call(model, params, (batch[0],))
        return nn.functional.cross_entropy(out, batch[1])

    counting = _Counting(loss, 3000)
    fs = FiniteSum(counting, (X, y), regularizer=lambda w: 1e-3 * (w**2).sum())
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    r = minimize(fs, w0, "subsampled-newton", options={"gtol": 1e-9})
    assert r.success, r.message
    assert counting.part > 0  # first phase: 10 per unknown = 260 samples
    assert float(torch.func.grad(fs)(r.x).abs().max()) <= 1e-9
    assert float(torch.linalg.eigvalsh(torch.func.hessian(fs)(r.x))[0]) > -1e-8


# ------------------------------------------------------------- the default method
def test_the_default_for_a_finite_sum_is_subsampled_newton():
    """method=None: subsampled Newton (with its warm start) for a FiniteSum autograd
    differentiates and whose Hessian fits dense_max; trust-ncg otherwise, and for a plain
    function. The default run still ends at scikit-learn's solution."""
    fs, X, y = _tall_logistic()
    x0 = torch.zeros(11, dtype=D)
    r = minimize(fs, x0, options=TIGHT)
    assert r.method == "subsampled-newton" and r.success
    assert float((r.x - _sklearn_logistic(X, y)).norm() / r.x.norm()) <= 1e-8
    with pytest.warns(OptimizeWarning, match="dense_max"):  # not an option of trust-ncg
        assert minimize(fs, x0, max_iter=1, options={"dense_max": 10}).method == "trust-ncg"
    g = torch.func.grad(fs)
    assert minimize(fs, x0, grad=g, max_iter=1).method == "trust-ncg"
    assert minimize(lambda x: (x**2).sum(), x0).method == "trust-ncg"


# ------------------------------------------------------------ budgets and restarts
@pytest.mark.parametrize("max_iter", [1, 3])
def test_the_phases_keep_within_max_iter(max_iter):
    fs, _, _ = _tall_logistic()
    r = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", max_iter=max_iter)
    assert r.nit == max_iter and r.status == "max_iterations"


def test_a_restart_at_a_solution_stays_there():
    """Without grad_rtol x0 is not evaluated over all the data before the phases; at a
    minimiser every sample's gradient is within twice its noise, so no phase moves it."""
    fs, _, _ = _tall_logistic()
    opts = {**TIGHT, "saddle_check": False}
    x = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts).x
    again = minimize(fs, x, "subsampled-newton", options={**opts, "gtol": 1e-6})
    assert again.nit == 0 and again.nfev == 1 and torch.equal(again.x, x)


def test_a_relative_test_is_relative_to_x0_not_to_the_warm_start():
    """grad_rtol=0.5: the phases' point (its gradient about a tenth of the start's) passes
    at once, so the run is x0's evaluation and the warm point's."""
    fs, _, _ = _tall_logistic()
    opts = {"gtol": 0.0, "grad_rtol": 0.5, "norm": 2, "saddle_check": False}
    r = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)
    assert r.success and r.nfev == 2 and r.nit > 0  # the phases' iterations


def test_the_full_loop_starts_with_the_phases_damping(monkeypatch):
    """The damping that the last phase reached (LM: shrunk after its good steps) is the
    full loop's first, not options["damping"] again."""
    import hesse._minimize._finite_sum as fsm

    seen = []
    direction = fsm.dense_newton_direction
    hessian = fsm._subsample_hessian

    def spy_hessian(obj, fs, *args):
        seen.append(["phase" if isinstance(fs, SampleSum) else "full"])
        return hessian(obj, fs, *args)

    def spy_direction(H, g, damping):
        seen[-1].append(damping)
        return direction(H, g, damping)

    monkeypatch.setattr(fsm, "_subsample_hessian", spy_hessian)
    monkeypatch.setattr(fsm, "dense_newton_direction", spy_direction)
    fs, _, _ = _tall_logistic()
    minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options={"gtol": 1e-8})
    first_full = next(i for i, (where, _) in enumerate(seen) if where == "full")
    assert first_full > 1 and seen[0][1] == 1e-3
    assert seen[first_full][1] < 1e-3 / 2  # shrunk in the phases, carried over


# ------------------------------------------------------------------ mixed precision
class _DtypeCounting:
    """A loss that counts its calls on all the data, by dtype."""

    def __init__(self, loss, n):
        self.loss, self.n, self.full = loss, n, {torch.float32: 0, torch.float64: 0}

    def __call__(self, x, batch):
        if len(batch[0]) == self.n:
            self.full[batch[0].dtype] += 1
        assert batch[0].dtype == x.dtype
        return self.loss(x, batch)


def test_mixed_precision_ends_at_the_float64_minimiser():
    """precision='mixed': the method first on a float32 copy of the data, then float64
    from its point. The result is float64's (scikit-learn's solution to 1e-8, at a
    gradient of 1e-13), most evaluations over all the data are float32's and nfev counts
    both; the user's data stays as it was."""
    fs, X, y = _tall_logistic()
    counting = _DtypeCounting(fs.loss, fs.samples)
    data = fs.data
    kept = [t.clone() for t in data]
    fs = FiniteSum(counting, data, regularizer=fs.regularizer)
    opts = {**TIGHT, "precision": "mixed", "saddle_check": False, "subsample_max": 0.5}
    r = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)
    assert r.success, r.message
    assert r.x.dtype == D and r.jac.dtype == D and float(r.jac.abs().max()) <= 1e-13
    assert float((r.x - _sklearn_logistic(X, y)).norm() / r.x.norm()) <= 1e-8
    assert counting.full[torch.float32] > counting.full[torch.float64] >= 1
    assert r.nfev == counting.full[torch.float32] + counting.full[torch.float64]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(data, kept))


def test_mixed_precision_leaves_float64_one_evaluation_where_float32_can_finish():
    """gtol 1e-7 is within what float32 resolves of this gradient (not of f: the stage has
    no test on f's changes, and its Armijo search allows for float32's rounding of f), so
    the float32 stage gets there in a handful of evaluations and float64 only checks."""
    fs, _, _ = _tall_logistic()
    counting = _DtypeCounting(fs.loss, fs.samples)
    fs = FiniteSum(counting, fs.data, regularizer=fs.regularizer)
    opts = {"gtol": 1e-7, "precision": "mixed", "saddle_check": False, "subsample_max": 0.5}
    r = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)
    assert r.success and float(r.jac.abs().max()) <= 1e-7
    assert counting.full[torch.float64] == 1 and counting.full[torch.float32] <= 7


def test_mixed_precision_on_a_problem_with_a_closed_form_hessian():
    """Problem.objective's closed-form Hessian follows the point's dtype (its private model
    copy is cast): the same solution as in full precision."""
    p = synthetic_logistic(20000, 10, seed=4)
    fs, w0 = p.objective(p.make_model())
    x0 = torch.zeros_like(w0)
    runs = [
        minimize(fs, x0, "subsampled-newton", options={**TIGHT, "precision": prec})
        for prec in ("full", "mixed")
    ]
    assert all(r.success for r in runs)
    torch.testing.assert_close(runs[1].x, runs[0].x, rtol=1e-9, atol=1e-12)


def test_mixed_precision_with_a_loss_that_cannot_run_in_float32_warns_and_goes_on():
    X, y = _data(4000)
    W = torch.eye(4, dtype=D)  # a float64 constant: float32 inputs meet it in a matmul

    def loss(x, batch):
        return _bce(x, ((batch[0] @ W), batch[1]))

    fs = FiniteSum(loss, (X, y))
    x0 = torch.zeros(5, dtype=D)
    with pytest.warns(OptimizeWarning, match="precision='mixed'.*float64 alone"):
        r = minimize(fs, x0, "subsampled-newton", options={"precision": "mixed"})
    full = minimize(fs, x0, "subsampled-newton")  # the same run: float64 alone, phases too
    assert r.success and torch.equal(r.x, full.x) and r.nfev == full.nfev


def test_mixed_precision_from_float32_is_float32():
    """No dtype below float32 here: precision='mixed' from a float32 start runs as 'full'."""
    fs, _, _ = _tall_logistic()
    fs32 = FiniteSum(fs.loss, tuple(t.float() for t in fs.data), regularizer=fs.regularizer)
    x0 = torch.zeros(11)
    a = minimize(fs32, x0, "subsampled-newton", options={"precision": "mixed"})
    b = minimize(fs32, x0, "subsampled-newton")
    assert a.success and torch.equal(a.x, b.x) and a.nfev == b.nfev


@pytest.mark.parametrize("bad", ["half", "float32", None, 32])
def test_bad_precision_raises(bad):
    fs, _, _ = _tall_logistic(n=1000)
    with pytest.raises(ValueError, match="precision"):
        opts = {"precision": bad}
        minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)


@pytest.mark.parametrize("max_fev", [2, 3, 5, 8])
def test_mixed_precision_within_max_fev_returns_a_float64_point(max_fev):
    """The float32 stage leaves float64 two evaluations of max_fev: the result is a point
    evaluated in float64, never x0 with a NaN value."""
    fs, _, _ = _tall_logistic()
    opts = {"precision": "mixed", "max_fev": max_fev, "gtol": 1e-12}
    r = minimize(fs, torch.zeros(11, dtype=D), "subsampled-newton", options=opts)
    assert math.isfinite(float(r.fun)) and r.nfev <= max_fev
    assert float(r.fun) < float(fs(torch.zeros(11, dtype=D)))


def test_mixed_precision_on_a_problem_float32_does_not_resolve():
    """Correlation 0.9999 between neighbouring features (condition number near 1e8): the
    float32 stage stalls, float64 takes over with a fresh damping, and the run ends on
    its gradient test (it had ended on ftol with success and |g| 7e-9 against gtol 1e-9,
    carrying a damping grown on float32's rounding noise)."""
    X, y = synthetic_logistic(40000, 100, features="correlated", rho=0.9999, seed=2).train
    fs = FiniteSum(
        _bce, (X, y[:, 0].contiguous()), regularizer=lambda x: 0.5 / 40000 * (x[:-1] ** 2).sum()
    )
    opts = {"gtol": 1e-9, "saddle_check": False, "precision": "mixed"}
    r = minimize(fs, torch.zeros(101, dtype=D), "subsampled-newton", options=opts)
    assert r.status == "converged" and float(r.jac.abs().max()) <= 1e-9
