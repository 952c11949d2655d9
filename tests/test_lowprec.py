"""Analysis in low precision, the products' own error (``product_rtol``), tied weights.

Half-precision cases are checked against the float64 Hessian of the *same point* (the
half model's weights and data cast to float64), formed by ``torch.func.hessian`` of the
loss as a function of the flat parameters and diagonalised by ``torch.linalg.eigvalsh``.
The tolerances follow from the unit roundoff ``u`` (bfloat16: 2**-8, float16: 2**-11):
the algorithms' ``error_floor`` is ``4 eps = 8u`` times the largest eigenvalue, a
converged residual is at most that floor, so an eigenvalue is certain to ``16 u |A|``
(6% in bfloat16): a sign flip or a factor 2 is far outside it.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
from hesse import CurvatureOperator, DenseOperator, HessianOperator
from hesse.analysis import parameter_blocks
from hesse.linalg import hutchpp_trace, lanczos, low_rank, power_iteration, xdiag, xtrace
from hesse.linalg._common import promote

HALF = [torch.bfloat16, torch.float16]
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
F64 = {"dtype": torch.float64}


# -- problems ---------------------------------------------------------------------------
class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _problem(name: str):
    """A model, its loss and a batch (float32); small enough for a dense reference."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        X, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    if name == "conv":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
        )
        X, y = torch.randn(16, 1, 7, 7, generator=g), torch.randint(0, 3, (16,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    model = LSTMNet()
    X, y = torch.randn(16, 5, 3, generator=g), torch.randn(16, 2, generator=g)
    return model, nn.MSELoss(), X, y


def dense_hessian(model, loss_fn, X, y) -> torch.Tensor:
    """The float64 Hessian of the loss in the flat (canonical) parameters of ``model``."""
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]

    def f(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(named, parts, shapes)}
        return loss_fn(functional_call(model, params, (X,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])
    return torch.func.hessian(f)(theta)


@functools.cache
def case(name: str, dtype: torch.dtype):
    """The model in ``dtype``, its data, and the float64 reference Hessian at that point."""
    model, loss_fn, X, y = _problem(name)
    model = model.to(dtype)
    X = X.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    ref = model_copy_f64(name, model)
    D = dense_hessian(ref, loss_fn, X.double(), y.double() if y.is_floating_point() else y)
    return model, loss_fn, (X, y), D, torch.linalg.eigvalsh(D)


def model_copy_f64(name, model):
    ref = _problem(name)[0].double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return ref


def operator(name, dtype):
    model, loss_fn, data, D, lam = case(name, dtype)
    return HessianOperator(model, loss_fn, data), D, lam


CASES = [(n, d) for n in ("mlp", "conv", "lstm") for d in HALF]
IDS = [f"{n}-{str(d)[6:]}" for n, d in CASES]


def norm2(lam):
    return float(lam.abs().max())


def floor_bound(dtype, lam):
    """What ``error_floor`` is documented to be at most: 8u times the norm (+1% for a
    Ritz value a little above the norm of the computed operator)."""
    return 8 * U[dtype] * norm2(lam) * 1.01


# -- Task 1: every analysis in half precision --------------------------------------------
@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_extreme_eigenvalues_are_certified_to_the_precision_of_the_products(name, dtype):
    H, _, lam = operator(name, dtype)
    for r in (
        hesse.eigenvalues(H, k=1, which="both", seed=0),
        lanczos(H.linearize(), k=1, which="both", tol=1e-12, seed=0),  # tol below the dtype
    ):
        assert r.dtype == dtype and r.eigenvalues.dtype == torch.float32
        assert r.status == "converged" and bool(r.converged.all())
        assert r.matvecs < H.shape[0]  # stopped at the floor, not at the whole space
        assert 0 < r.error_floor <= floor_bound(dtype, lam)
        assert bool((r.residuals <= r.error_floor + 1e-3 * r.eigenvalues.abs()).all())
        # the certificate holds: each end within its residual plus the floor of the truth
        lo, hi = r.eigenvalues.tolist()
        assert abs(lo - float(lam[0])) <= float(r.residuals[0]) + r.error_floor
        assert abs(hi - float(lam[-1])) <= float(r.residuals[1]) + r.error_floor
        Y = r.eigenvectors.double()
        torch.testing.assert_close(Y.T @ Y, torch.eye(2, **F64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_power_iteration(dtype):
    H, _, lam = operator("mlp", dtype)  # |lambda| largest 0.72, next 0.48
    r = power_iteration(H.linearize(), tol=1e-12, max_iter=200, seed=0)
    assert r.dtype == dtype and r.status == "converged" and r.matvecs < 200
    assert abs(float(r.eigenvalues[0]) - float(lam[-1])) <= float(r.residuals[0]) + r.error_floor


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_trace_and_diagonal(name, dtype):
    H, D, lam = operator(name, dtype)
    n = H.shape[0]
    # The trace of the computed block: each of its P diagonal entries is off by a few u of
    # its scale; their sum by at most 8u times the trace norm sum|lambda|.
    tr_tol = 8 * U[dtype] * float(lam.abs().sum())
    tr = float(D.trace())
    for r in (
        xtrace(H, 2 * n, seed=0),  # n probes: the range is captured, the estimate exact
        hutchpp_trace(H, 3 * n, seed=0),  # likewise
    ):
        assert r.dtype == dtype and r.status == "budget" and r.stderr == 0.0
        assert abs(r.estimate - tr) <= tr_tol
    r = hesse.trace(H, num_matvecs=60, seed=0)
    assert r.dtype == dtype and math.isfinite(r.stderr)
    assert abs(r.estimate - tr) <= 4 * r.stderr + tr_tol
    # a diagonal entry e_i' A e_i is one product: off by at most the floor
    for r in (hesse.diagonal(H, "exact"), xdiag(H, 2 * n, seed=0)):
        assert r.dtype == dtype and r.estimate.dtype == torch.float32
        err = (r.estimate.double() - D.diagonal()).abs().max()
        assert float(err) <= floor_bound(dtype, lam)
    r = hesse.diagonal(H, "xdiag", 60, seed=0)
    assert r.dtype == dtype and bool(torch.isfinite(r.estimate).all())
    bound = 4 * r.stderr.double() + floor_bound(dtype, lam)  # 4 standard errors + floor
    outside = (r.estimate.double() - D.diagonal()).abs() > bound
    assert float(outside.double().mean()) < 0.05


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_spectral_density_matches_the_same_probes_in_float64(name, dtype):
    H, D, lam = operator(name, dtype)
    r = hesse.spectral_density(H, num_probes=3, steps=20, seed=0)
    ref = hesse.spectral_density(D, num_probes=3, steps=20, seed=0)  # the same sign probes
    assert r.dtype == dtype and ref.dtype == torch.float64 and r.status == "budget"
    assert r.density.dtype == torch.float32 and bool(torch.isfinite(r.density).all())
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-4)
    # v'Av and v'A^2 v of a unit probe: off by the products' error |A| 8u (times 2|A|)
    e = floor_bound(dtype, lam)
    assert abs(r.moments(1) - ref.moments(1)) <= e
    assert abs(r.moments(2) - ref.moments(2)) <= 2 * norm2(lam) * e + e**2
    assert ref.moments(1) == pytest.approx(float(D.trace()) / D.shape[0], abs=0.5 * norm2(lam))


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_convexity_and_condition_number(name, dtype):
    H, _, lam = operator(name, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.linalg.ConvergenceWarning)
        reports = [hesse.convexity(H), hesse.convexity(H, dense_limit=0, seed=0)]
    for rep in reports:
        assert rep.dtype == dtype and rep.error_floor <= floor_bound(dtype, lam)
        margin = rep.error_floor + max(rep.residuals)
        assert abs(rep.min_eigenvalue - float(lam[0])) <= margin
        assert abs(rep.max_eigenvalue - float(lam[-1])) <= margin
        ref = hesse.analysis.verdict(float(lam[0]), float(lam[-1]), rep.tol)
        if min(abs(float(lam[0])), abs(float(lam[-1]))) > 3 * margin:
            assert rep.certified and rep.verdict == ref  # both ends clear of zero
        if rep.certified:
            assert rep.verdict == ref or (rep.verdict, ref) in (
                ("positive_semidefinite", "positive_definite"),
                ("negative_semidefinite", "negative_definite"),
            )
    c = hesse.condition_number(H, seed=0)
    assert c.dtype == dtype and c.status in ("converged", "precision")
    if float(lam[0]) < -2 * c.error_floor:
        assert c.value == math.inf and c.status == "converged"


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_layer_report_rows_match_the_dense_blocks(name, dtype):
    model, loss_fn, data, D, _ = case(name, dtype)
    # exact_limit 30: small blocks densely (exact), larger by Lanczos and XTrace
    rep = hesse.layer_report(model, loss_fn, data, exact_limit=30, seed=0)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = dict(zip(sizes, [0, *torch.tensor(list(sizes.values())).cumsum(0).tolist()]))
    assert [r.name for r in rep.rows] == list(parameter_blocks(model))
    for row, names in zip(rep.rows, parameter_blocks(model).values()):
        idx = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in names])
        block = D[idx][:, idx]
        lam = torch.linalg.eigvalsh(block)
        assert row.dtype == dtype and row.size == idx.numel()
        assert 0 < row.error_floor <= floor_bound(dtype, lam)
        # dense: the floor; Lanczos: a converged residual adds at most tol |theta| or the floor
        e = row.error_floor if row.size <= 30 else 2 * row.error_floor + 1e-3 * norm2(lam)
        if row.converged:
            assert abs(row.top_eigenvalue - float(lam[-1])) <= e
            assert abs(row.min_eigenvalue - float(lam[0])) <= e
        tr_tol = 8 * U[dtype] * float(lam.abs().sum()) + 4 * row.trace_stderr
        assert abs(row.trace - float(block.trace())) <= tr_tol
    assert rep.as_dicts()[0]["dtype"] == str(dtype)[6:]


def test_a_zero_eigenvalue_has_no_certified_sign_in_bfloat16():
    # The last layer of a softmax classifier is flat along shifting all logits: its
    # Hessian block is PSD with an exact zero eigenvalue. float64 certifies "PSD";
    # bfloat16 cannot tell the zero from its error and must not certify a verdict.
    model, loss_fn, data, _, _ = case("mlp", torch.bfloat16)
    last = hesse.layer_report(model, loss_fn, data, blocks={"2": ["2.weight", "2.bias"]})
    row = last.rows[0]
    assert not row.converged and abs(row.min_eigenvalue) <= row.error_floor
    assert "error of torch.bfloat16 products" in last.to_table()
    ref = model_copy_f64("mlp", model)
    X, y = data
    exact = hesse.layer_report(ref, loss_fn, (X.double(), y), blocks={"2": ["2.weight", "2.bias"]})
    assert exact.rows[0].converged and exact.rows[0].verdict == "positive_semidefinite"


@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_low_rank_keeps_the_operator_dtype(dtype):
    H, _, lam = operator("mlp", dtype)
    L = low_rank(H, 2, seed=0)
    assert L.dtype == dtype and bool(torch.isfinite(L.s).all())
    top = lam[lam.abs().argsort(descending=True)[:2]]
    # eigen: two converged pairs (2 floors), then rounded to the dtype (u |lambda|)
    tol = 2 * floor_bound(dtype, lam) + U[dtype] * norm2(lam)
    torch.testing.assert_close(L.s.double(), top, atol=tol, rtol=0)
    v = torch.randn(H.shape[0]).to(dtype)
    assert bool(torch.isfinite((H - L) @ v).all())  # it combines with the operator
    model, loss_fn, data, _, _ = case("mlp", dtype)
    G = hesse.GGNOperator(model, loss_fn, data)
    N = low_rank(G, 3, "nystrom", seed=0)
    assert N.dtype == dtype and bool((N.s >= 0).all()) and float(N.s[0]) > 0


def test_float32_and_float64_operators_are_not_promoted_and_keep_their_dtype():
    model, loss_fn, X, y = _problem("mlp")
    H = HessianOperator(model, loss_fn, (X, y))
    assert promote(H) is H
    r = hesse.eigenvalues(H, seed=0)
    assert r.dtype == torch.float32 and r.eigenvalues.dtype == torch.float32
    assert r.eigenvectors.dtype == torch.float32
    assert hesse.trace(H, seed=0).dtype == torch.float32
    d = hesse.diagonal(H, seed=0)
    assert d.dtype == torch.float32 and d.estimate.dtype == torch.float32
    s = hesse.spectral_density(H, num_probes=2, steps=10, seed=0)
    assert s.dtype == torch.float32 and s.nodes.dtype == torch.float32
    assert hesse.convexity(H).dtype == torch.float32
    assert hesse.condition_number(H, seed=0).dtype == torch.float32
    assert {r.dtype for r in hesse.layer_report(model, loss_fn, (X, y)).rows} == {torch.float32}
    assert low_rank(H, 2, seed=0).dtype == torch.float32
    A = torch.diag(torch.arange(1.0, 6.0, **F64))
    assert promote(DenseOperator(A)).dtype == torch.float64
    assert lanczos(A, seed=0, tol=1e-10).dtype == torch.float64


# -- Task 2: product_rtol ----------------------------------------------------------------
class Perturbed(CurvatureOperator):
    """An exact operator plus an error of known relative size ``delta``: ``A v + delta
    |A| e`` with ``|e| = |v|``, either a fixed symmetric matrix (``fresh=False``) or new
    noise at each product (as a finite-difference operator). Like one, it reports
    ``product_rtol = delta`` only once it has made products."""

    def __init__(self, inner: object, delta: float, *, fresh: bool = False, seed: int = 0):
        inner = inner if isinstance(inner, CurvatureOperator) else DenseOperator(inner)
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner, self.delta, self.fresh = inner, delta, fresh
        self.norm = float(torch.linalg.matrix_norm(inner.to_dense(), 2))
        self.g = torch.Generator().manual_seed(seed)
        M = torch.randn(self.shape, generator=self.g, dtype=self.dtype)
        S = M + M.T
        self.E = delta * self.norm * S / torch.linalg.matrix_norm(S, 2)

    def _matmat(self, V):
        self.product_rtol = self.delta
        if not self.fresh:
            return self.inner @ V + self.E @ V
        N = torch.randn(V.shape, generator=self.g, dtype=V.dtype)
        N = N * (torch.linalg.vector_norm(V, dim=0) / torch.linalg.vector_norm(N, dim=0))
        return self.inner @ V + self.delta * self.norm * N


def with_spectrum(lam):
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, **F64)).Q
    return Q @ torch.diag(lam) @ Q.T


@pytest.mark.parametrize("fresh", [False, True], ids=["fixed", "fresh-noise"])
def test_lanczos_carries_the_product_error_floor(fresh):
    lam = torch.cat([torch.linspace(-1.0, 5.0, 99, **F64), torch.tensor([10.0], **F64)])
    delta = 1e-3
    op = Perturbed(with_spectrum(lam), delta, fresh=fresh)
    assert op.product_rtol == 0.0  # it learns its error from its products
    r = lanczos(op, k=1, tol=1e-12, max_iter=80, seed=0)
    # converged at the floor, not at tol (which noise would never reach) ...
    assert r.status == "converged" and r.matvecs < 80
    assert r.error_floor == pytest.approx(delta * float(r.eigenvalues.abs().max()))
    assert "accuracy of torch.float64 products" in r.message
    # ... and the certificate with the floor holds, where tol alone would not
    err = abs(float(r.eigenvalues[0]) - 10.0)
    assert err <= float(r.residuals[0]) + r.error_floor
    assert err > r.tol * 10.0  # "converged to tol" would have been false
    exact = lanczos(with_spectrum(lam), k=1, tol=1e-12, max_iter=80, seed=0)
    assert exact.error_floor == pytest.approx(4 * 2.0**-52 * 10.0, rel=1e-6)


@pytest.mark.parametrize("dense_limit", [500, 0], ids=["dense", "lanczos"])
@pytest.mark.parametrize(
    "lo,certified",
    [(0.5, True), (2e-3, False), (-2e-3, False), (-0.5, True)],
)
def test_convexity_certifies_no_sign_within_the_product_error(dense_limit, lo, certified):
    lam = torch.cat([torch.tensor([lo], **F64), torch.linspace(1.0, 10.0, 39, **F64)])
    op = Perturbed(with_spectrum(lam), 1e-3)  # error 1e-2: the sign of +-2e-3 is unknown
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = hesse.convexity(op, dense_limit=dense_limit, max_iter=40, seed=0)
    assert rep.certified is certified
    assert rep.error_floor == pytest.approx(1e-3 * rep.max_eigenvalue)
    assert abs(rep.min_eigenvalue - lo) <= rep.error_floor + rep.residuals[0]
    assert rep.exact is (dense_limit > 0)
    if certified:
        assert rep.verdict == ("positive_definite" if lo > 0 else "indefinite")
    else:
        assert any("products' error" in str(w.message) for w in caught)
    exact = hesse.convexity(with_spectrum(lam), dense_limit=dense_limit, max_iter=40, seed=0)
    assert exact.certified  # without the product error every verdict here is certified


def test_condition_number_is_not_resolved_within_the_product_error():
    for lo, status in ((0.5, "converged"), (2e-3, "precision")):
        lam = torch.cat([torch.tensor([lo], **F64), torch.linspace(1.0, 10.0, 39, **F64)])
        c = hesse.condition_number(Perturbed(with_spectrum(lam), 1e-3), seed=0)
        assert c.status == status and c.error_floor == pytest.approx(1e-3 * c.largest)
        if status == "converged":
            # kappa = hi/lo with each end off by at most residual + floor
            e_lo = float(c.residuals[0]) + c.error_floor
            e_hi = float(c.residuals[-1]) + c.error_floor
            assert (10 - e_hi) / (lo + e_lo) <= c.value <= (10 + e_hi) / (lo - e_lo)
        else:
            assert "not resolved" in c.message and not c.success


def test_layer_report_honours_product_rtol():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), **F64)
    y = torch.arange(20) % 3
    loss_fn = nn.CrossEntropyLoss()

    def report(delta):
        make = lambda *a, **k: Perturbed(HessianOperator(*a, **k), delta)  # noqa: E731
        return hesse.layer_report(model, loss_fn, (X, y), _operator=make).rows

    exact, noisy = report(0.0), report(1e-2)
    # the softmax layer's exact zero eigenvalue: certified PSD when exact, not with error
    assert exact[-1].converged and exact[-1].verdict == "positive_semidefinite"
    assert not noisy[-1].converged
    for row in noisy:
        top = max(abs(row.top_eigenvalue), abs(row.min_eigenvalue))
        assert row.error_floor == pytest.approx(1e-2 * top, rel=1e-6)


# -- Task 3: tied weights ---------------------------------------------------------------
def tied_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    m[2].weight = m[0].weight
    return m.double()


def test_parameter_blocks_list_a_tied_weight_once_under_its_canonical_name():
    m = tied_model()
    assert parameter_blocks(m) == {"0": ["0.weight"], "1": ["1.weight", "1.bias"]}
    m[1].bias.requires_grad_(False)
    assert parameter_blocks(m) == {"0": ["0.weight"], "1": ["1.weight"]}


def test_layer_report_of_a_tied_model_matches_the_dense_blocks():
    m = tied_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (24,), generator=g), torch.randint(0, 10, (24,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    D = dense_hessian(m, loss_fn, x, y)  # over the canonical parameters: 0.weight, 1.*
    rep = hesse.layer_report(m, loss_fn, (x, y), exact_limit=64)
    index = {"0": slice(0, 40), "1": slice(40, 60)}
    assert [r.name for r in rep.rows] == ["0", "1"]
    for row, params in zip(rep.rows, parameter_blocks(m).values()):
        block = D[index[row.name], index[row.name]]
        H = HessianOperator(m, loss_fn, (x, y), params=params).to_dense()
        torch.testing.assert_close(H, block, rtol=1e-10, atol=1e-12)
        lam = torch.linalg.eigvalsh(block)
        assert row.top_eigenvalue == pytest.approx(float(lam[-1]), rel=1e-8)
        assert row.min_eigenvalue == pytest.approx(float(lam[0]), rel=1e-8, abs=1e-12)
        assert row.trace == pytest.approx(float(block.trace()), rel=1e-10)
