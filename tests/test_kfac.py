"""KFAC and EKFAC against dense float64 references where they are exact, and their algebra.

References are the blocks of ``GGNOperator(...).to_dense()`` (tested against an explicit
``J^T H J`` in test_operators.py) or are built here from the factors with ``torch.kron``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from conftest import cnn, make_data, mlp
from hesse.operators import EKFACOperator, FisherOperator, GGNOperator, KFACOperator

F64 = torch.float64


def _blocks(K: KFACOperator):
    """The slices of the flat vector of each block (parameters adjacent, in order)."""
    out, start = [], 0
    for b in K.blocks:
        n = b.A.shape[0] * b.G.shape[0]
        out.append(slice(start, start + n))
        start += n
    return out


def _joint(K, j: int, dense: torch.Tensor) -> torch.Tensor:
    """Block ``j`` of a flat ``dense`` matrix (weight entries, then bias entries) reordered
    to the joint layout of ``G kron A``: row-major ``[W | b]``."""
    b, s = K.blocks[j], _blocks(K)[j]
    out, d = b.G.shape[0], b.A.shape[0]
    if len(b.params) == 2:
        perm = [
            o * (d - 1) + i if i < d - 1 else out * (d - 1) + o
            for o in range(out)
            for i in range(d)
        ]
    else:
        perm = list(range(out * d))
    idx = torch.arange(s.start, s.stop)[perm]
    return dense[idx][:, idx]


def _block_errors(K, ref: torch.Tensor) -> list[float]:
    dense = K.to_dense()
    return [
        float((dense[s, s] - ref[s, s]).norm() / ref[s, s].norm().clamp_min(1e-300))
        for s in _blocks(K)
    ]


def deep_linear(seed=0, dims=(4, 5, 3, 2)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(dims)]).double()


def batches(n_batches=3, n=6, d_in=4, d_out=2, seed=1, sizes=None):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [n] * n_batches
    return [
        (
            torch.randn(m, d_in, generator=g, dtype=F64),
            torch.randn(m, d_out, generator=g, dtype=F64),
        )
        for m in sizes
    ]


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_kfac_is_the_ggn_block_diagonal_of_a_deep_linear_network(reduction):
    model = deep_linear()
    data = batches(sizes=[5, 7, 3])  # unequal batches: the weighting is tested too
    loss = nn.MSELoss(reduction=reduction)
    K = KFACOperator(model, loss, data)
    ggn = GGNOperator(model, loss, data).to_dense()
    assert max(_block_errors(K, ggn)) < 1e-12
    dense = K.to_dense()
    s = _blocks(K)
    assert dense[s[0], s[1]].abs().max() == 0  # block diagonal
    # a DataLoader gives the same operator
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])
    loader = DataLoader(TensorDataset(X, Y), batch_size=4)
    assert torch.allclose(KFACOperator(model, loss, loader).to_dense(), dense, atol=1e-12)


def test_blocks_are_g_kron_a_in_hesse_layout_for_any_parameter_order_and_subset():
    model = deep_linear()
    data = batches()
    loss = nn.MSELoss()
    names = ["2.bias", "2.weight", "0.weight", "1.bias"]  # 0.bias and 1.weight left out
    K = KFACOperator(model, loss, data, params=names)
    ggn = GGNOperator(model, loss, data, params=names).to_dense()
    dense = K.to_dense()
    assert [b.module for b in K.blocks] == ["2", "0", "1"]
    b2 = K.blocks[0]
    assert b2.params == ("2.bias", "2.weight") and b2.A.shape == (4, 4)
    # flat: bias (2) then weight (2 x 3); the block is G kron A on row-major [W | b]
    perm = [2 + o * 3 + i if i < 3 else o for o in range(2) for i in range(4)]
    assert torch.allclose(dense[perm][:, perm], torch.kron(b2.G, b2.A), atol=1e-14)
    assert K.blocks[1].A.shape == (4, 4)  # weight alone: no one appended
    assert K.blocks[2].A.shape == (1, 1) and float(K.blocks[2].A) == 1.0  # bias alone
    # every selected entry is exact (deep linear, MSE); entries across layers are zero
    for lo, hi in [(0, 8), (8, 28), (28, 31)]:
        ref = ggn[lo:hi, lo:hi]
        assert torch.allclose(dense[lo:hi, lo:hi], ref, atol=1e-12 * ref.abs().max())
    assert dense[8:28, 28:31].abs().max() == 0 and dense[:8, 8:].abs().max() == 0


@pytest.mark.parametrize("loss_name", ["ce", "bce", "ce_cnn"])
def test_type2_kfac_and_ekfac_are_exact_for_one_sample(loss_name):
    if loss_name == "ce_cnn":
        model, loss = cnn(), nn.CrossEntropyLoss()
        x, y = make_data("ce", n=1, image=True)
    else:
        model = mlp()
        loss = nn.CrossEntropyLoss() if loss_name == "ce" else nn.BCEWithLogitsLoss()
        x, y = make_data(loss_name, n=1)
    ggn = GGNOperator(model, loss, (x, y)).to_dense()
    K = KFACOperator(model, loss, (x, y))
    E = EKFACOperator(model, loss, (x, y))
    # exact without weight sharing (cnn: the first convolution has 9 output positions)
    shared = 1 if loss_name == "ce_cnn" else 0
    assert max(_block_errors(K, ggn)[shared:]) < 1e-10
    assert max(_block_errors(E, ggn)[shared:]) < 1e-10
    # and not for two samples: the test can tell
    x2, y2 = make_data(loss_name.split("_")[0], n=2, image=loss_name == "ce_cnn")
    K2 = KFACOperator(model, loss, (x2, y2))
    assert max(_block_errors(K2, GGNOperator(model, loss, (x2, y2)).to_dense())) > 1e-3


class Positionwise(nn.Module):
    """Deep linear layers applied to each position of a sequence (N, R, d)."""

    def __init__(self, pool: bool):
        super().__init__()
        torch.manual_seed(3)
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.pool = pool

    def forward(self, x):
        h = self.l2(self.l1(x))
        return self.head(h.mean(1) if self.pool else h)


def _sequences(pool: bool, sizes=(4, 3)):
    g = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(n, 5, 3, generator=g, dtype=F64),
            torch.randn(n, *((2,) if pool else (5, 2)), generator=g, dtype=F64),
        )
        for n in sizes
    ]


@pytest.mark.parametrize("pool", [False, True])
def test_expand_and_reduce_are_exact_in_their_weight_sharing_cases(pool):
    """Eschenhagen et al. (2023): KFAC-expand is exact for a deep linear network applied to
    every position with a loss over all positions; KFAC-reduce when the positions are
    pooled before the loss; each is not exact in the other's case."""
    model = Positionwise(pool).double()
    data = _sequences(pool)
    loss = nn.MSELoss()
    ggn = GGNOperator(model, loss, data).to_dense()
    exact, other = ("reduce", "expand") if pool else ("expand", "reduce")
    assert max(_block_errors(KFACOperator(model, loss, data, weight_sharing=exact), ggn)) < 1e-12
    errs = _block_errors(KFACOperator(model, loss, data, weight_sharing=other), ggn)
    assert max(errs[:2]) > 1e-2  # the shared layers


class ConvNet(nn.Module):
    """conv 3x3 (the shared layer) -> conv 1x1 (position-wise) -> pixels or pooled head."""

    def __init__(self, pool: bool):
        super().__init__()
        torch.manual_seed(4)
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(2, 2) if pool else None
        self.pool = pool

    def forward(self, x):
        h = self.c2(self.c1(x))
        return self.head(h.mean((2, 3))) if self.pool else h.permute(0, 2, 3, 1)


@pytest.mark.parametrize("pool", [False, True])
def test_kfc_expand_and_reduce_are_exact_for_linear_convolutions(pool):
    model = ConvNet(pool).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=F64)
    y = torch.randn(3, *((2,) if pool else (3, 3, 2)), generator=g, dtype=F64)
    loss = nn.MSELoss()
    ggn = GGNOperator(model, loss, (x, y)).to_dense()
    exact, other = ("reduce", "expand") if pool else ("expand", "reduce")
    assert max(_block_errors(KFACOperator(model, loss, (x, y), weight_sharing=exact), ggn)) < 1e-12
    assert _block_errors(KFACOperator(model, loss, (x, y), weight_sharing=other), ggn)[0] > 1e-2


# -- Fisher types --------------------------------------------------------------------------------
def test_mc_kfac_converges_to_type2_and_is_seeded():
    model, loss = mlp(), nn.CrossEntropyLoss()
    data = make_data("ce", n=8)
    ref = KFACOperator(model, loss, data).to_dense()

    def err(m: int, seed: int = 0) -> float:
        K = KFACOperator(
            model,
            loss,
            data,
            fisher="mc",
            mc_samples=m,
            generator=torch.Generator().manual_seed(seed),
        )
        return float((K.to_dense() - ref).norm() / ref.norm())

    few, many = err(2), err(2000)
    assert many < 0.05 and many < few / 5
    assert err(3, seed=1) == err(3, seed=1)


def test_empirical_kfac_of_one_sample_is_the_empirical_fisher_block():
    model, loss = mlp(), nn.MSELoss()
    data = make_data("mse", n=1)
    F = FisherOperator(model, loss, data, kind="empirical").to_dense()
    K = KFACOperator(model, loss, data, fisher="empirical")
    assert max(_block_errors(K, F)) < 1e-10


# -- EKFAC ---------------------------------------------------------------------------------------
def test_ekfac_equals_kfac_before_the_refit_and_is_closer_to_the_ggn_after():
    model, loss = mlp(), nn.CrossEntropyLoss()
    data = [make_data("ce", n=6, seed=s) for s in (1, 2)]
    ggn = GGNOperator(model, loss, data).to_dense()
    K = KFACOperator(model, loss, data)
    E0 = EKFACOperator(model, loss, data, refit=False)
    assert torch.allclose(E0.to_dense(), K.to_dense(), atol=1e-13)
    E0.refit()
    E = EKFACOperator(model, loss, data)
    assert torch.allclose(E0.to_dense(), E.to_dense(), atol=1e-13)
    dk, de = K.to_dense(), E.to_dense()
    ratios = []
    for j, (s, b) in enumerate(zip(_blocks(K), E.blocks)):
        ek, ee = (dk[s, s] - ggn[s, s]).norm(), (de[s, s] - ggn[s, s]).norm()
        ratios.append(float(ee / ek))
        # the refit is the GGN block's diagonal in the eigenbasis, exactly
        _, qa, _, qg = b.eigh()
        Q = torch.kron(qg, qa)
        diag = torch.diag(Q.T @ _joint(E, j, ggn) @ Q)
        assert torch.allclose(diag, b.eigenvalues.reshape(-1), rtol=1e-10, atol=1e-12 * diag.max())
    # never farther from the GGN than KFAC, block by block; strictly closer somewhere
    assert max(ratios) <= 1 + 1e-12 and min(ratios) < 0.9


# -- inverse, trace, logdet, Frobenius -------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_inverse_trace_logdet_frobenius_match_the_dense_matrix(cls):
    model, loss = cnn(), nn.CrossEntropyLoss()
    data = make_data("ce", n=5, image=True)
    K = cls(model, loss, data)
    D = K.to_dense()
    eye = torch.eye(D.shape[0], dtype=F64)
    lam = 0.3
    inv = K.inverse(damping=lam).to_dense()
    assert torch.allclose(inv @ (D + lam * eye), eye, atol=1e-10)
    assert torch.allclose(K.trace(), D.trace(), rtol=1e-12)
    assert torch.allclose(K.frobenius_norm(), D.norm(), rtol=1e-12)
    assert torch.allclose(K.logdet(damping=lam), torch.logdet(D + lam * eye), rtol=1e-10)
    if cls is KFACOperator:
        # pi damping: (G + sqrt(lam)/pi I)^-1 kron (A + pi sqrt(lam) I)^-1 per block
        P = K.inverse(damping=lam, method="pi").to_dense()
        for j, b in enumerate(K.blocks):
            pi = math.sqrt((b.A.trace() / b.A.shape[0]) / (b.G.trace() / b.G.shape[0]))
            r = math.sqrt(lam)
            ref = torch.kron(
                torch.linalg.inv(b.G + r / pi * torch.eye(b.G.shape[0], dtype=F64)),
                torch.linalg.inv(b.A + r * pi * torch.eye(b.A.shape[0], dtype=F64)),
            )
            assert torch.allclose(_joint(K, j, P), ref, atol=1e-10 * ref.abs().max())
    else:
        with pytest.raises(ValueError, match="exact"):
            K.inverse(damping=lam, method="pi")


def test_eigendecompositions_are_cached_until_update():
    model = deep_linear()
    data = batches()
    K = KFACOperator(model, nn.MSELoss(), data)
    first = K.blocks[0].eigh()
    assert K.blocks[0].eigh() is first
    before = K.to_dense()
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert torch.equal(K.to_dense(), before)  # the factors are those of the old point
    K.update()
    assert K.blocks[0]._eig is None and not torch.allclose(K.to_dense(), before)


def test_analysis_functions_accept_a_kfac_operator():
    model, loss = mlp(), nn.CrossEntropyLoss()
    K = KFACOperator(model, loss, make_data("ce", n=6))
    exact = torch.linalg.eigvalsh(K.to_dense())
    top = hesse.eigenvalues(K, k=2, tol=1e-8, seed=0)
    assert torch.allclose(top.eigenvalues, exact.flip(0)[:2], rtol=1e-6)
    tr = hesse.trace(K, num_matvecs=K.shape[0] + 6, seed=0)
    assert abs(float(tr.estimate) - float(K.trace())) < 1e-6 * float(K.trace())
    dens = hesse.spectral_density(K, num_probes=2, steps=10, grid=50, seed=0)
    assert dens.density.shape == (50,)


# -- data conventions ----------------------------------------------------------------------------
class DictSeq(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.emb = nn.Linear(3, 4)
        self.out = nn.Linear(4, 5)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.out(torch.tanh(self.emb(input_ids)))}


def test_dict_batches_and_token_weighting_are_invariant_under_rebatching():
    """CrossEntropy over tokens with ignored labels: batches weighted by their counted
    tokens give the factors of the whole data as one batch."""
    model = DictSeq().double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, 3, generator=g, dtype=F64)
    y = torch.randint(0, 5, (6, 4), generator=g)
    y[0, 1:] = -100
    y[3, :3] = -100

    loss = nn.CrossEntropyLoss()

    def batch(i, j):
        return {"input_ids": x[i:j], "labels": y[i:j]}

    # logits (N, R, C) need the class dim 1 for nn.CrossEntropyLoss: move it
    io = hesse.ModelIO(output=lambda out: out["logits"].transpose(1, 2))
    whole = KFACOperator(model, loss, batch(0, 6), io=io)
    split = KFACOperator(model, loss, [batch(0, 2), batch(2, 5), batch(5, 6)], io=io)
    for (a1, g1), (a2, g2) in zip(whole.factors.values(), split.factors.values()):
        assert torch.allclose(a1, a2, atol=1e-13) and torch.allclose(g1, g2, atol=1e-13)

    # the flattened form is a loss written as a function: with its likelihood named, the
    # same factors (the per-token scales are recovered from the loss's gradient)
    def fn_loss(logits, t):
        return nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten())

    with pytest.raises(ValueError, match="likelihood="):
        KFACOperator(model, fn_loss, batch(0, 6))
    tokens = hesse.ModelIO(weight=lambda b: float((b["labels"] >= 0).sum()))
    named = KFACOperator(
        model, fn_loss, [batch(0, 2), batch(2, 6)], likelihood="categorical", io=tokens
    )
    for (a1, g1), (a2, g2) in zip(whole.factors.values(), named.factors.values()):
        assert torch.allclose(a1, a2, atol=1e-13) and torch.allclose(g1, g2, atol=1e-13)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_type2_of_a_loss_written_as_a_function_with_a_named_likelihood(likelihood):
    model = mlp()
    x, y = make_data("bce", n=6)
    F_ = nn.functional
    if likelihood == "gaussian":
        fn, ref = (lambda o, t: ((o - t) ** 2).mean()), nn.MSELoss()
    else:
        fn, ref = (lambda o, t: F_.binary_cross_entropy_with_logits(o, t)), nn.BCEWithLogitsLoss()
    K = KFACOperator(model, fn, (x, y), likelihood=likelihood).to_dense()
    assert torch.allclose(K, KFACOperator(model, ref, (x, y)).to_dense(), atol=1e-14)
    with pytest.raises(ValueError, match="not of that form"):  # not a likelihood's NLL
        KFACOperator(model, lambda o, t: (o - t).abs().mean(), (x, y), likelihood=likelihood)


# -- peers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_factors_match_curvlinops(arch, fisher):
    curvlinops = pytest.importorskip("curvlinops")
    model = mlp() if arch == "mlp" else cnn()
    loss = nn.CrossEntropyLoss()
    data = [make_data("ce", n=4, seed=s, image=arch == "cnn") for s in (1, 2)]
    for approx in ("expand", "reduce"):
        K = KFACOperator(model, loss, data, fisher=fisher, weight_sharing=approx)
        C = curvlinops.KFACLinearOperator(
            model,
            loss,
            list(model.parameters()),
            data,
            fisher_type=fisher,
            kfac_approx=approx,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        C.compute_kronecker_factors()
        for name, (A, G) in K.factors.items():
            assert torch.allclose(A, C._input_covariances[name], atol=1e-6)
            assert torch.allclose(G, C._gradient_covariances[name], atol=1e-6)


# -- errors --------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    data = batches(d_in=3)
    loss = nn.MSELoss()
    with pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\).*params="):
        KFACOperator(model, loss, data)
    ok = ["0.weight", "0.bias", "2.weight"]
    for kw, match in [
        ({"fisher": "gauss"}, "fisher must be one of"),
        ({"weight_sharing": "mean"}, "weight_sharing must be one of"),
        ({"mc_samples": 3}, "mc_samples applies to fisher='mc'"),
        ({"fisher": "mc", "mc_samples": 0}, "mc_samples must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            KFACOperator(model, loss, data, params=ok, **kw)
    K = KFACOperator(model, loss, data, params=ok)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            K.inverse(damping=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        K.inverse(damping=1.0, method="tikhonov")
    # a layer called twice in one forward pass
    lin = nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match="more than once"):
        KFACOperator(nn.Sequential(lin, nn.Tanh(), lin), loss, batches(d_in=3, d_out=3))
    # grouped convolutions are not covered
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double()
    with pytest.raises(ValueError, match="groups=2"):
        KFACOperator(conv, loss, (torch.randn(2, 2, 3, 3, dtype=F64), torch.randn(2, 2, dtype=F64)))
    # a non-finite loss
    x, y = batches()[0]
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss"):
        KFACOperator(deep_linear(), loss, (x, y))


# -- the optimizer -------------------------------------------------------------------------------
def _closure(opt, model, x, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["exact", "pi"])
def test_kfac_optimizer_step_is_the_damped_inverse_of_the_empirical_kfac(arch, method):
    model = mlp() if arch == "mlp" else cnn()
    x, y = make_data("ce", n=8, image=arch == "cnn")
    loss = nn.CrossEntropyLoss()
    K = KFACOperator(model, loss, (x, y), fisher="empirical")
    g = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g]) + 0.1 * _flat(model)  # weight decay 0.1
    expected = _flat(model) - 0.5 * (K.inverse(damping=0.3, method=method) @ g)
    opt = hesse.optim.KFAC(model, lr=0.5, damping=0.3, weight_decay=0.1, damping_method=method)
    opt.step(_closure(opt, model, x, y))
    assert torch.allclose(_flat(model), expected, atol=1e-12)


def test_kfac_optimizer_factors_are_running_averages_refreshed_on_schedule():
    model = mlp()
    data = [make_data("ce", n=8, seed=s) for s in (1, 2, 3)]
    loss = nn.CrossEntropyLoss()
    opt = hesse.optim.KFAC(
        model, lr=0.1, damping=0.1, factor_decay=0.7, update_each=2, inverse_each=3
    )
    owner = model[0].weight
    expected_A = None
    for t, (x, y) in enumerate(data):
        Kt = KFACOperator(model, loss, (x, y), fisher="empirical")
        A_t = Kt.blocks[0].A
        if t % 2 == 0:
            expected_A = A_t if expected_A is None else 0.7 * expected_A + 0.3 * A_t
        eig_before = opt.state[owner].get("eig")
        opt.step(_closure(opt, model, x, y))
        assert torch.allclose(opt.state[owner]["A"], expected_A, atol=1e-13)
        refreshed = eig_before is None or opt.state[owner]["eig"] is not eig_before
        assert refreshed == (t % 3 == 0)


def test_kfac_optimizer_state_dict_resumes_exactly():
    import copy

    x, y = make_data("ce", n=8, image=True)

    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(_closure(opt, model, x, y))

    kw = dict(lr=0.2, damping=0.5, momentum=0.9, update_each=2, inverse_each=3)
    model = cnn()
    opt = hesse.optim.KFAC(model, **kw)
    run(model, opt, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, 4)
    resumed = cnn(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = hesse.optim.KFAC(resumed, lr=1.0)  # every setting comes from the state dict
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, 4)
    assert torch.equal(_flat(resumed), _flat(model))
    # the state of another model is refused, the previous state kept
    other = hesse.optim.KFAC(mlp(), lr=0.1)
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(saved_opt)


def test_kfac_optimizer_trains_and_checks_its_settings():
    torch.manual_seed(0)
    model = mlp()
    x, y = make_data("ce", n=32)
    opt = hesse.optim.KFAC(model, lr=0.5, damping=0.1, momentum=0.5)
    closure = _closure(opt, model, x, y)
    first = float(opt.step(closure))
    for _ in range(15):
        last = float(opt.step(closure))
    assert last < 0.7 * first
    for kw, match in [
        ({"damping": 0.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"update_each": 0}, "update_each"),
        ({"damping_method": "tikhonov"}, "damping_method"),
        ({"weight_sharing": "mean"}, "weight_sharing"),
    ]:
        with pytest.raises(ValueError, match=match):
            hesse.optim.KFAC(model, **kw)
    opt.param_groups[0]["damping"] = -1.0  # a scheduler's mistake is caught at the step
    with pytest.raises(ValueError, match="damping"):
        opt.step(closure)


def test_kfac_optimizer_with_a_batch_uses_the_operators_type2_factors():
    model = mlp()
    x, y = make_data("ce", n=8)
    loss = nn.CrossEntropyLoss()
    K = KFACOperator(model, loss, (x, y))
    g = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    expected = _flat(model) - 0.5 * (K.inverse(damping=0.3) @ torch.cat([t.reshape(-1) for t in g]))
    opt = hesse.optim.KFAC(model, lr=0.5, damping=0.3, loss_fn=loss, fisher="type-2")
    with pytest.raises(ValueError, match="batch"):
        opt.step(_closure(opt, model, x, y))
    opt.step(_closure(opt, model, x, y), batch=(x, y))
    assert torch.allclose(_flat(model), expected, atol=1e-12)
    with pytest.raises(ValueError, match="loss_fn"):
        hesse.optim.KFAC(model, fisher="mc")
    # hesse.optim.compare hands it the batch
    curves = hesse.optim.compare(
        mlp,
        loss,
        make_data("ce", n=32),
        {"kfac": lambda m: hesse.optim.KFAC(m, lr=0.3, damping=0.1, loss_fn=loss, fisher="mc")},
        epochs=4,
        batch_size=16,
    )
    assert curves["kfac"].loss[-1] < curves["kfac"].loss[0]


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
        dict(kernel_size=3, padding=2, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", stride=(1, 2)),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_convolution_patches_reproduce_the_layer(conv):
    """The rows KFC's factors are made of: the layer's output is patches @ W^T + b."""
    from hesse.operators._kfac import _input_rows, _output_rows

    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, **conv).double()
    x = torch.randn(2, 2, 6, 7, dtype=F64)
    out = layer(x)
    rows = _input_rows(layer, x) @ layer.weight.reshape(3, -1).T + layer.bias
    assert torch.allclose(rows, _output_rows(layer, out[None])[0], atol=1e-12)


def test_float32_models_keep_their_dtype():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    for cls in (KFACOperator, EKFACOperator):
        K = cls(model, nn.CrossEntropyLoss(), data)
        assert all(b.A.dtype == torch.float32 and b.G.dtype == torch.float32 for b in K.blocks)
        v = torch.randn(K.shape[0])
        assert (K @ v).dtype == torch.float32 and (K.inverse(0.1) @ v).dtype == torch.float32


# -- the optimizer's iterates, written out in plain torch ------------------------------------
class _Scale(nn.Module):
    """A parameter outside KFAC's layers: it steps along its gradient over the damping."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(1.3, dtype=F64))

    def forward(self, x):
        return self.c * x


def _reference_model(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), _Scale()).double()


def _reference_iterates(model, data, *, lr, damping, momentum, wd, rho, T, T_inv):
    r"""hesse.optim.KFAC's documented update, independently: per step on the batch's mean
    cross-entropy, A_t = mean_i [x_i; 1][x_i; 1]^T, G_t = N sum_i g_i g_i^T (g_i: the
    gradient of the mean loss at sample i's layer output), running averages every T steps
    (the first taken as is), (G kron A + damping I)^-1 from the factors of the last refresh
    (every T_inv steps) applied to vec_row([dW | db]) of the gradient plus weight decay,
    momentum m = mu m + d, theta -= lr m; the scale steps along its gradient / damping."""
    W1, b1 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    W2, c = model[2].weight.detach().clone(), model[3].c.detach().clone()
    theta = [W1, b1, W2, c]
    A = G = snap = None
    buf = None
    out = []
    for t, (x, y) in enumerate(data):
        ps = [p.clone().requires_grad_() for p in theta]
        W1r, b1r, W2r, cr = ps
        s1 = x @ W1r.T + b1r
        a1 = torch.tanh(s1)
        s2 = a1 @ W2r.T
        loss = nn.functional.cross_entropy(cr * s2, y)
        grads = torch.autograd.grad(loss, [*ps, s1, s2])
        g = [gp + wd * p for gp, p in zip(grads[:4], theta)]
        gs1, gs2 = grads[4], grads[5]
        n = x.shape[0]
        if t % T == 0:
            x1 = torch.cat([x, torch.ones(n, 1, dtype=F64)], dim=1)
            new = [(x1.T @ x1 / n, n * gs1.T @ gs1), (a1.T @ a1 / n, n * gs2.T @ gs2)]
            new = [(a.detach(), gg.detach()) for a, gg in new]
            if A is None:
                A, G = [a for a, _ in new], [gg for _, gg in new]
            else:
                A = [rho * a + (1 - rho) * an for a, (an, _) in zip(A, new)]
                G = [rho * gg + (1 - rho) * gn for gg, (_, gn) in zip(G, new)]
        if t % T_inv == 0:
            snap = [torch.kron(gg, a) for a, gg in zip(A, G)]

        def solve(K, M):
            rhs = M.reshape(-1)
            return torch.linalg.solve(K + damping * torch.eye(len(rhs), dtype=F64), rhs)

        d1 = solve(snap[0], torch.cat([g[0], g[1][:, None]], dim=1)).reshape(4, 4)
        d = [d1[:, :3], d1[:, 3], solve(snap[1], g[2]).reshape(2, 4), g[3] / damping]
        buf = d if buf is None or not momentum else [momentum * m + e for m, e in zip(buf, d)]
        theta = [p - lr * m for p, m in zip(theta, buf)]
        out.append(torch.cat([p.reshape(-1) for p in theta]))
    return out


@pytest.mark.parametrize(
    "settings",
    [
        dict(momentum=0.0, wd=0.0, rho=0.8, T=1, T_inv=1),
        dict(momentum=0.9, wd=0.05, rho=0.6, T=1, T_inv=2),
        dict(momentum=0.5, wd=0.1, rho=0.7, T=2, T_inv=1),
    ],
)
def test_kfac_optimizer_takes_the_reference_iterates(settings):
    data = [make_data("ce", n=n, d_in=3, d_out=2, seed=s) for n, s in ((6, 1), (9, 2), (5, 3))]
    model = _reference_model()
    lr, damping = 0.7, 0.05
    expected = _reference_iterates(model, data, lr=lr, damping=damping, **settings)
    opt = hesse.optim.KFAC(
        model,
        lr=lr,
        damping=damping,
        momentum=settings["momentum"],
        weight_decay=settings["wd"],
        factor_decay=settings["rho"],
        update_each=settings["T"],
        inverse_each=settings["T_inv"],
    )
    for (x, y), ref in zip(data, expected):
        opt.step(_closure(opt, model, x, y))
        assert torch.allclose(_flat(model), ref, rtol=0, atol=1e-12)
    # the steps are not small: a wrong rate, damping or factor would show
    assert float((expected[-1] - expected[0]).norm()) > 0.1


def test_kfac_reaches_a_training_loss_on_digits_in_fewer_epochs_than_sgd_with_momentum():
    """mlp-digits, mini-batches of 64 in a seeded order, the same initial weights: epochs
    until the training loss is within 0.1 of its floor (label smoothing's entropy). SGD
    runs at lr=0.3, momentum 0.9, the best of lr in {0.1, 0.3, 0.5, 1} (it needs 10
    epochs; 1 diverges); KFAC (type-2, damping 0.1, momentum 0.9) needs 5."""
    from hesse.problems import problem

    prob = problem("mlp-digits")
    X, y = prob.train
    target = prob.loss_floor + 0.1

    def epochs_to_target(make, max_epochs):
        torch.manual_seed(0)
        model = prob.make_model()
        opt = make(model)
        order = torch.Generator().manual_seed(0)
        for epoch in range(1, max_epochs + 1):
            perm = torch.randperm(len(X), generator=order)
            for i in range(0, len(X), 64):
                xb, yb = X[perm[i : i + 64]], y[perm[i : i + 64]]
                closure = _closure(opt, model, xb, yb, prob.loss_fn)
                if isinstance(opt, hesse.optim.KFAC):
                    opt.step(closure, batch=(xb, yb))
                else:
                    opt.step(closure)
            with torch.no_grad():
                if float(prob.loss_fn(model(X), y)) <= target:
                    return epoch
        return math.inf

    kfac = epochs_to_target(
        lambda m: hesse.optim.KFAC(
            m,
            lr=0.1,
            damping=0.1,
            momentum=0.9,
            inverse_each=1,
            loss_fn=prob.loss_fn,
            fisher="type-2",
        ),
        max_epochs=8,
    )
    assert kfac <= 6
    sgd = epochs_to_target(lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), kfac)
    assert sgd > kfac


# -- the layer report's KFAC column ------------------------------------------------------------
def _ggn_block_reference(model, X, y, names):
    """The exact GGN block of a mean cross-entropy: sum_i J_i^T (diag p_i - p_i p_i^T) J_i / N,
    from the Jacobian of the outputs with respect to the block's parameters (hesse's flat
    layout: the parameters in order, each row-major)."""
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in model.named_parameters()}
    block = {n: params[n] for n in names}

    def outputs(p):
        return functional_call(model, {**params, **p}, (X,))

    J = jacrev(outputs)(block)  # {name: (N, C, *shape)}
    J = torch.cat([J[n].flatten(2) for n in names], dim=2)  # (N, C, P)
    p = torch.softmax(outputs(block).detach(), dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, H, J) / X.shape[0]


def test_layer_report_gives_kfacs_error_against_the_exact_ggn_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = make_data("ce", n=9, d_in=4)
    loss = nn.CrossEntropyLoss()
    rep = hesse.layer_report(model, loss, (X, y), kfac=True, exact_limit=24)
    rows = {r.name: r for r in rep.rows}
    assert rows["1"].kfac_error is None  # LayerNorm: not a layer KFAC covers
    assert rows["0"].kfac_error is None  # 25 parameters: more than exact_limit
    # the last layer (18 parameters) against the dense references built here
    names = ["3.weight", "3.bias"]
    G = _ggn_block_reference(model, X, y, names)
    K = KFACOperator(model, loss, (X, y), params=names)
    b = K.blocks[0]
    G_joint = _joint(K, 0, G)  # reorder to [W | b] row-major, where the block is G kron A
    want = float((torch.kron(b.G, b.A) - G_joint).norm() / G_joint.norm())
    assert 1e-3 < want < 1.0  # KFAC is not exact here: the column measures something
    assert abs(rows["3"].kfac_error - want) <= 1e-10 * want
    # the first layer once it fits, and the report's table and dicts carry the column
    rep = hesse.layer_report(model, loss, (X, y), kfac=True, exact_limit=30)
    names = ["0.weight", "0.bias"]
    K0 = KFACOperator(model, loss, (X, y), params=names)
    G0 = _joint(K0, 0, _ggn_block_reference(model, X, y, names))
    b0 = K0.blocks[0]
    want0 = float((torch.kron(b0.G, b0.A) - G0).norm() / G0.norm())
    assert abs(rep.rows[0].kfac_error - want0) <= 1e-10 * want0
    assert (
        "KFAC err" in rep.to_table() and rep.as_dicts()[0]["kfac_error"] == rep.rows[0].kfac_error
    )
    plain = hesse.layer_report(model, loss, (X, y))
    assert "kfac_error" not in plain.as_dicts()[0] and "KFAC" not in plain.to_table()
    # exact where KFAC is: a deep linear network with a squared error
    lin = deep_linear()
    x, t = batches()[0]
    rep = hesse.layer_report(lin, nn.MSELoss(), (x, t), kfac=True, exact_limit=30)
    assert all(r.kfac_error is not None and r.kfac_error < 1e-12 for r in rep.rows)
    with pytest.raises(TypeError, match="kfac"):
        hesse.layer_report(model, loss, (X, y), kfac="yes")


def test_kfac_optimizer_kl_clip_scales_the_step():
    """kl_clip: the step is the unclipped one times nu = min(1, sqrt(kappa / |lr^2 d.g|)),
    with d the preconditioned direction (-step / lr) and g the gradient, computed here from
    the unclipped step; a large kappa changes nothing."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    lr, kappa = 0.5, 1e-4

    def one_step(kl_clip):
        model = copy.deepcopy(base)
        opt = hesse.optim.KFAC(model, lr=lr, damping=0.1, kl_clip=kl_clip)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        return torch.cat(
            [(p - q).reshape(-1) for p, q in zip(model.parameters(), base.parameters())]
        )

    model = copy.deepcopy(base)
    nn.functional.mse_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    free = one_step(None)
    nu = min(1.0, math.sqrt(kappa / abs(lr * float(free @ g))))
    assert nu < 0.5  # the case clips
    torch.testing.assert_close(one_step(kappa), nu * free, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(one_step(1e6), free, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kl_clip"):
        hesse.optim.KFAC(base, kl_clip=-1.0)
