"""OutputCurvature: closed-form output Hessians, Fisher factors, named likelihoods and the
normaliser of a mean loss, each against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev
from torch.nn import functional as F

from hesse import fisher_vp, ggn_vp
from hesse.func import OutputCurvature
from hesse.func._output import fisher_mm, loss_normalizer

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_out_hessian(loss_fn, out, targets):
    """The Hessian of the loss with respect to the outputs, flattened, by torch.func."""
    d = out.numel()
    return hessian(lambda o: loss_fn(o.reshape(out.shape), targets))(out.reshape(-1)).reshape(d, d)


def closed_form_out_hessian(curv, out, targets):
    d = out.numel()
    basis = torch.eye(d, dtype=out.dtype).reshape(d, *out.shape)
    return curv.hessian_mm(out, targets, basis).reshape(d, d)


def seq_targets(n, t, c, seed, ignored=()):
    y = torch.randint(0, c, (n, t), generator=gen(seed))
    for i, j in ignored:
        y[i, j] = -100
    return y


# -- closed forms of the output Hessian --------------------------------------------------------
CE_CASES = {
    "2d": dict(shape=(5, 4)),
    "2d-weights-ignore": dict(shape=(5, 4), weight=True, ignore=True),
    "seq": dict(shape=(3, 4, 5)),
    "seq-ignore": dict(shape=(3, 4, 5), ignore=True),
    "seq-weights-ignore": dict(shape=(3, 4, 5), weight=True, ignore=True),
    "seq-smoothing-weights-ignore": dict(shape=(3, 4, 5), weight=True, ignore=True, eps=0.2),
    "2d-extra-dims": dict(shape=(2, 3, 2, 3), weight=True, ignore=True, eps=0.1),
    "seq-sum": dict(shape=(3, 4, 5), weight=True, ignore=True, reduction="sum"),
    "probs": dict(shape=(3, 4, 5), probs=True),
    "probs-weights-smoothing": dict(shape=(3, 4, 5), probs=True, weight=True, eps=0.3),
    "probs-unnormalised-sum": dict(shape=(4, 3), probs=True, reduction="sum", scale=2.5),
}


def ce_problem(case):
    shape = case["shape"]
    n, c = shape[0], shape[1]
    g = gen(0)
    out = 2 * torch.randn(shape, generator=g, dtype=DT)
    weight = torch.rand(c, generator=g, dtype=DT) + 0.3 if case.get("weight") else None
    if case.get("probs"):
        y = torch.softmax(torch.randn(shape, generator=g, dtype=DT), 1) * case.get("scale", 1)
    else:
        y = torch.randint(0, c, (n, *shape[2:]), generator=g)
        if case.get("ignore"):
            y.view(-1)[::3] = 7  # ignore_index 7: not a class here, a value the loss skips
    loss = nn.CrossEntropyLoss(
        weight=weight,
        ignore_index=-100 if case.get("probs") else 7,
        label_smoothing=case.get("eps", 0.0),
        reduction=case.get("reduction", "mean"),
    )
    return loss, out, y


@pytest.mark.parametrize("name", CE_CASES)
def test_cross_entropy_output_hessian_is_the_dense_hessian(name):
    loss, out, y = ce_problem(CE_CASES[name])
    curv = OutputCurvature(loss)
    assert curv._closed_form(out, y)  # the closed form, not the autograd fallback
    torch.testing.assert_close(
        closed_form_out_hessian(curv, out, y),
        dense_out_hessian(loss, out, y),
        rtol=1e-10,
        atol=1e-12,
    )


def test_bce_with_weights_output_hessian_is_the_dense_hessian():
    g = gen(1)
    out = torch.randn(3, 4, 2, generator=g, dtype=DT)
    y = torch.randint(0, 2, (3, 4, 2), generator=g).to(DT)
    loss = nn.BCEWithLogitsLoss(
        weight=torch.rand(4, 1, generator=g, dtype=DT) + 0.5,
        pos_weight=torch.rand(2, generator=g, dtype=DT) + 1.5,
    )
    torch.testing.assert_close(
        closed_form_out_hessian(OutputCurvature(loss), out, y),
        dense_out_hessian(loss, out, y),
        rtol=1e-10,
        atol=1e-12,
    )


def test_unbatched_cross_entropy_falls_back_to_autograd():
    out, y = torch.randn(4, dtype=DT, generator=gen(2)), torch.tensor(2)
    curv = OutputCurvature(nn.CrossEntropyLoss())
    assert not curv._closed_form(out, y)
    torch.testing.assert_close(
        closed_form_out_hessian(curv, out, y),
        dense_out_hessian(nn.CrossEntropyLoss(), out, y),
    )


# -- the normaliser of a mean loss -------------------------------------------------------------
@pytest.mark.parametrize("name", [k for k in CE_CASES if "sum" not in k])
def test_normalizer_is_what_the_mean_divides_by(name):
    loss, out, y = ce_problem(CE_CASES[name])
    total = nn.CrossEntropyLoss(
        weight=loss.weight,
        ignore_index=loss.ignore_index,
        label_smoothing=loss.label_smoothing,
        reduction="sum",
    )(out, y)
    w = loss_normalizer(loss, out.shape, y)
    torch.testing.assert_close(loss(out, y) * w, total)


def test_normalizer_of_other_losses():
    y = seq_targets(2, 5, 4, 3, ignored=[(0, 1), (1, 0), (1, 4)])
    assert loss_normalizer(nn.NLLLoss(), None, y) == 7.0
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert loss_normalizer(nn.NLLLoss(weight=w), None, y) == float(w[y[y != -100]].sum())
    assert loss_normalizer(nn.MSELoss(), (2, 5, 3), torch.zeros(2, 5, 3)) == 30.0
    assert loss_normalizer(nn.MSELoss(), (2, 5, 3), torch.zeros(5, 3)) == 30.0  # broadcast
    assert loss_normalizer(nn.BCEWithLogitsLoss(), None, torch.zeros(4, 2)) == 8.0
    assert loss_normalizer(nn.L1Loss(), None, torch.zeros(3)) == 3.0
    assert loss_normalizer(nn.CrossEntropyLoss(reduction="sum"), None, y) is None
    assert loss_normalizer(nn.MSELoss(reduction="sum"), None, torch.zeros(3)) is None

    def lm(o, t):
        return F.cross_entropy(o.flatten(0, 1), t.flatten())

    assert loss_normalizer(lm, None, y) is None  # unknown without a likelihood
    assert loss_normalizer(lm, None, y, likelihood="categorical") == 7.0
    y[0, 0] = 4  # not a class of 4-class outputs
    assert loss_normalizer(lm, (2, 5, 4), y, likelihood="categorical") == 6.0
    assert loss_normalizer(lambda o, t: F.mse_loss(o, t), None, torch.zeros(2, 3), "gaussian") == 6
    assert loss_normalizer(nn.CrossEntropyLoss(), None, [1, 2]) is None


# -- a small sequence model over batches --------------------------------------------------------
D, V = 3, 4  # features, classes


def batch_outputs(X):
    """x -> logits (N, T, V), nonlinear in x."""
    return lambda x: 2 * torch.tanh(X @ x.reshape(D, V)) + 0.3 * (X @ x.reshape(D, V)) ** 2


def lm_loss(o, t):
    return F.cross_entropy(o.flatten(0, 1), t.flatten())


def two_batches():
    g = gen(4)
    x = 0.5 * torch.randn(D * V, generator=g, dtype=DT)
    X1 = torch.randn(3, 5, D, generator=g, dtype=DT)
    X2 = torch.randn(2, 3, D, generator=g, dtype=DT)  # other sequence length
    y1 = seq_targets(3, 5, V, 5, ignored=[(0, 4), (1, 3), (1, 4), (2, 0), (2, 4)])
    y2 = seq_targets(2, 3, V, 6, ignored=[(1, 2)])
    return x, [(X1, y1), (X2, y2)]


def reference_ggn(x, batches, weight=None):
    """Dense GGN of sum_b sum-loss_b / sum_b W_b: the loss over all counted tokens."""
    sum_loss = nn.CrossEntropyLoss(weight=weight, reduction="sum")
    total = sum(loss_normalizer(nn.CrossEntropyLoss(weight=weight), None, y) for _, y in batches)
    G = 0
    for X, y in batches:
        f = batch_outputs(X)
        J = jacrev(f)(x).reshape(-1, x.numel())
        H = dense_out_hessian(lambda o, t: sum_loss(o.transpose(1, 2), t) / total, f(x), y)
        G = G + J.T @ H @ J
    return G


def combine(products_and_weights):
    num = sum(w * p for p, w in products_and_weights)
    return num / sum(w for _, w in products_and_weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_batches_weighted_by_normalizer_give_the_ggn_over_all_tokens(weighted):
    x, batches = two_batches()
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT) if weighted else None
    module = nn.CrossEntropyLoss(weight=weight)
    eye = torch.eye(x.numel(), dtype=DT)
    parts = [
        (
            ggn_vp(lambda x, X=X: batch_outputs(X)(x).transpose(1, 2), module, x, eye, y),
            loss_normalizer(module, None, y),
        )
        for X, y in batches
    ]
    G = reference_ggn(x, batches, weight)
    torch.testing.assert_close(combine(parts), G, rtol=1e-10, atol=1e-12)
    # weighting by batch size instead (3 and 2 sequences) is not the same operator
    sized = combine([(p, X.shape[0]) for (p, _), (X, _) in zip(parts, batches)])
    assert (sized - G).norm() > 1e-3 * G.norm()
    if not weighted:  # the function-written loss with a named likelihood weighs the same
        lm_parts = [
            (
                ggn_vp(batch_outputs(X), lm_loss, x, eye, y),
                loss_normalizer(lm_loss, None, y, likelihood="categorical"),
            )
            for X, y in batches
        ]
        torch.testing.assert_close(combine(lm_parts), G, rtol=1e-10, atol=1e-12)


def test_ggn_over_batches_of_a_linear_model_is_the_hessian():
    # For logits linear in x the GGN is the Hessian: an independent reference by torch.func.
    x, batches = two_batches()
    total = sum(loss_normalizer(nn.CrossEntropyLoss(), None, y) for _, y in batches)

    def loss_all(x):
        sum_loss = nn.CrossEntropyLoss(reduction="sum")
        return sum(sum_loss((X @ x.reshape(D, V)).transpose(1, 2), y) for X, y in batches) / total

    eye = torch.eye(x.numel(), dtype=DT)
    parts = [
        (
            ggn_vp(lambda x, X=X: X @ x.reshape(D, V), lm_loss, x, eye, y),
            loss_normalizer(lm_loss, None, y, likelihood="categorical"),
        )
        for X, y in batches
    ]
    torch.testing.assert_close(combine(parts), hessian(loss_all)(x), rtol=1e-10, atol=1e-12)


# -- empirical Fisher ---------------------------------------------------------------------------
def per_sequence_nll_grads(x, X, y, weight=None):
    """Gradients in x of each sequence's summed NLL, by autograd, sequence by sequence."""
    f = batch_outputs(X)

    def nll(x, i):
        o = f(x)[i]
        return F.cross_entropy(o, y[i], reduction="sum")

    return torch.stack([jacrev(nll)(x, i) for i in range(X.shape[0])])


def test_empirical_fisher_of_sequences_is_per_sequence_outer_products():
    # F = (1/W) sum_i grad NLL_i grad NLL_i^T, NLL_i the summed NLL of sequence i's counted
    # tokens: the loss is (1/W) sum_i NLL_i, c_i = 1/W, and the block of sequence i is
    # g_i g_i^T / c_i for g_i the gradient of the loss.
    x, batches = two_batches()
    eye = torch.eye(x.numel(), dtype=DT)
    parts, grads, total = [], [], 0.0
    for X, y in batches:
        w = loss_normalizer(nn.CrossEntropyLoss(), None, y)
        Fm = fisher_vp(lambda x, X=X: batch_outputs(X)(x).transpose(1, 2), nn.CrossEntropyLoss(),
                       x, eye, y)  # fmt: skip
        Fc = fisher_vp(batch_outputs(X), lm_loss, x, eye, y, likelihood="categorical")
        gs = per_sequence_nll_grads(x, X, y)
        torch.testing.assert_close(Fm, gs.T @ gs / w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(Fc, Fm, rtol=1e-10, atol=1e-12)
        # without a likelihood the loss's samples are taken as its NLLs (c_i = 1/N): the
        # Fisher of the per-sequence mean loss, g_i g_i^T * N
        F0 = fisher_vp(batch_outputs(X), lm_loss, x, eye, y)
        n = X.shape[0]
        gl = torch.stack([jacrev(_share, argnums=2)(X, y, x, i) for i in range(n)])
        torch.testing.assert_close(F0, n * gl.T @ gl, rtol=1e-10, atol=1e-12)
        parts.append((Fm, w))
        grads.append(gs)
        total += w
    gs = torch.cat(grads)
    # batches weighted by their normalisers: the empirical Fisher over all tokens
    torch.testing.assert_close(combine(parts), gs.T @ gs / total, rtol=1e-10, atol=1e-12)


def _share(X, y, x, i):
    """Sequence i's part of the mean token loss of the batch."""
    o = batch_outputs(X)(x)
    return F.cross_entropy(o[i], y[i], reduction="sum") / (y != -100).sum()


def test_empirical_fisher_with_class_weights_is_g_gT_over_c():
    # c_i of sequence i: the mean over its counted tokens of w[y] / W (w[y_i] / W in 2-d, as
    # before), so sum_i c_i NLL-weighted-by-w/mean-w is the loss.
    out = torch.randn(3, 4, 5, generator=gen(7), dtype=DT)
    y = seq_targets(3, 5, 4, 8, ignored=[(0, 0), (2, 1), (2, 2)])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    loss = nn.CrossEntropyLoss(weight=w)
    S, c = OutputCurvature(loss).fisher_factors(out, y, "empirical")
    g = torch.func.grad(lambda o: loss(o, y))(out)
    valid = y != -100
    W = w[y.clamp(0)][valid].sum()
    ci = torch.stack([w[y[i][valid[i]]].mean() / W for i in range(3)])
    torch.testing.assert_close(c, ci)
    U = torch.randn(2, 3, 4, 5, generator=gen(9), dtype=DT)
    gf, Uf = g.reshape(3, -1), U.reshape(2, 3, -1)
    ref = torch.einsum("nd,kn->knd", gf, torch.einsum("nd,knd->kn", gf, Uf) / ci).reshape(U.shape)
    torch.testing.assert_close(fisher_mm(S, c, U), ref)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_empirical_fisher_of_elementwise_likelihoods(likelihood):
    # loss = (1/numel) sum_i NLL_i with NLL_i = ||o_i - y_i||^2 (gaussian) or the summed
    # BCE (bernoulli): the block of sample i is (1/numel) s_i s_i^T, s_i = 2 (o_i - y_i) or
    # sigmoid(o_i) - y_i, for the module and for the function naming the likelihood.
    out = torch.randn(3, 4, 2, generator=gen(40), dtype=DT)
    if likelihood == "gaussian":
        y = torch.randn(3, 4, 2, generator=gen(41), dtype=DT)
        fn, module, s = (lambda o, t: F.mse_loss(o, t)), nn.MSELoss(), 2 * (out - y)
    else:
        y = torch.randint(0, 2, (3, 4, 2), generator=gen(41)).to(DT)
        fn, module = (lambda o, t: F.binary_cross_entropy_with_logits(o, t)), nn.BCEWithLogitsLoss()
        s = torch.sigmoid(out) - y
    U = torch.randn(2, 3, 4, 2, generator=gen(42), dtype=DT)
    sf, Uf = s.reshape(3, -1), U.reshape(2, 3, -1)
    ref = torch.einsum("nd,kn->knd", sf, torch.einsum("nd,knd->kn", sf, Uf) / 24).reshape(U.shape)
    for loss, lik in ((module, None), (fn, likelihood)):
        S, c = OutputCurvature(loss, lik).fisher_factors(out, y, "empirical")
        torch.testing.assert_close(fisher_mm(S, c, U), ref)


# -- Monte-Carlo Fisher -------------------------------------------------------------------------
def test_mc_factors_of_a_named_categorical_match_the_closed_form_module():
    out = torch.randn(3, 5, 4, generator=gen(10), dtype=DT)  # (N, T, V)
    y = seq_targets(3, 5, 4, 11, ignored=[(0, 2), (1, 0), (1, 1)])
    Sm, cm = OutputCurvature(nn.CrossEntropyLoss()).fisher_factors(
        out.transpose(1, 2), y, "mc", gen(12), mc_samples=3
    )
    Sc, cc = OutputCurvature(lm_loss, likelihood="categorical").fisher_factors(
        out, y, "mc", gen(12), mc_samples=3
    )
    torch.testing.assert_close(cc, cm)
    torch.testing.assert_close(Sc, Sm.transpose(2, 3))
    # ... and through fisher_vp in parameter space
    x, batches = two_batches()
    X, y = batches[0]
    eye = torch.eye(x.numel(), dtype=DT)
    Fm = fisher_vp(lambda x: batch_outputs(X)(x).transpose(1, 2), nn.CrossEntropyLoss(), x, eye,
                   y, kind="mc", generator=gen(13), mc_samples=2)  # fmt: skip
    Fc = fisher_vp(batch_outputs(X), lm_loss, x, eye, y, kind="mc", generator=gen(13),
                   mc_samples=2, likelihood="categorical")  # fmt: skip
    torch.testing.assert_close(Fc, Fm, rtol=1e-10, atol=1e-12)


def test_mc_factors_of_a_loss_vmap_cannot_trace_are_drawn_one_by_one():
    def loss(o, t):  # data-dependent control flow on the targets: vmap refuses it
        return lm_loss(o, t) if bool((t >= 0).any()) else o.sum() * 0

    out = torch.randn(3, 5, 4, generator=gen(14), dtype=DT)
    y = seq_targets(3, 5, 4, 15, ignored=[(0, 2), (2, 4)])
    Sl, cl = OutputCurvature(loss, "categorical").fisher_factors(out, y, "mc", gen(16), 4)
    Sc, cc = OutputCurvature(lm_loss, "categorical").fisher_factors(out, y, "mc", gen(16), 4)
    torch.testing.assert_close((Sl, cl), (Sc, cc))


def out_space_fisher_draws(S, c):
    """Per-draw output-space Fisher blocks, (M, N, d, d)."""
    m, n = S.shape[:2]
    Sf = S.reshape(m, n, -1)
    return c[None, :, None, None] * Sf[..., :, None] * Sf[..., None, :]


def block_diagonal(H, n):
    d = H.shape[0] // n
    return torch.stack([H[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(n)])


MC_DRAWS = 20000
MC_CASES = {
    "ce-seq-ignore-weights-smoothing": lambda: (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), label_smoothing=0.1),
        torch.randn(2, 3, 3, generator=gen(20), dtype=DT),
        seq_targets(2, 3, 3, 21, ignored=[(1, 1)]),
        None,
    ),
    "categorical-function": lambda: (
        lm_loss,
        torch.randn(2, 3, 3, generator=gen(22), dtype=DT),
        seq_targets(2, 3, 3, 23, ignored=[(0, 2)]),
        "categorical",
    ),
    "bernoulli-pos-weight": lambda: (
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5], dtype=DT)),
        torch.randn(2, 3, 2, generator=gen(24), dtype=DT),
        torch.randint(0, 2, (2, 3, 2), generator=gen(25)).to(DT),
        None,
    ),
    "bernoulli-function-weighted": lambda: (
        lambda o, t: F.binary_cross_entropy_with_logits(
            o, t, weight=torch.tensor([1.0, 4.0], dtype=DT), reduction="sum"
        ),
        torch.randn(2, 3, 2, generator=gen(26), dtype=DT),
        torch.randint(0, 2, (2, 3, 2), generator=gen(27)).to(DT),
        "bernoulli",
    ),
    "gaussian-function-scaled": lambda: (
        lambda o, t: 0.5 * ((o - t) ** 2).sum() / o.shape[0],
        torch.randn(2, 3, 2, generator=gen(28), dtype=DT),
        torch.randn(2, 3, 2, generator=gen(29), dtype=DT),
        "gaussian",
    ),
}


@pytest.mark.parametrize("name", MC_CASES)
def test_mc_fisher_converges_to_the_ggn(name):
    loss, out, y, likelihood = MC_CASES[name]()
    n = out.shape[0]
    S, c = OutputCurvature(loss, likelihood).fisher_factors(out, y, "mc", gen(30), MC_DRAWS)
    draws = out_space_fisher_draws(S, c)
    est = draws.mean(0)
    se = draws.std(0) / math.sqrt(MC_DRAWS)  # standard error of each entry of the mean
    G = block_diagonal(dense_out_hessian(loss, out, y), n)
    # Every entry within 5 standard errors of the GGN (seeded: the check is deterministic) ...
    assert ((est - G).abs() <= 5 * se + 1e-12).all(), (est - G).abs().max()
    # ... and those errors small enough that a factor 2 or a flipped sign would be caught.
    assert se.max() < 0.05 * G.abs().max()
    # The same factors through fisher_mm: a product with the mean of the draws.
    U = torch.randn(2, *out.shape, generator=gen(31), dtype=DT)
    ref = torch.einsum("nij,knj->kni", est, U.reshape(2, n, -1)).reshape(U.shape)
    torch.testing.assert_close(fisher_mm(S, c, U), ref)


# -- errors ---------------------------------------------------------------------------------
def test_errors_name_the_fix():
    out = torch.randn(2, 3, 4, dtype=DT)
    y = torch.randint(0, 4, (2, 3))
    with pytest.raises(
        ValueError, match="kind='mc' needs the likelihood.*likelihood='categorical'"
    ):
        OutputCurvature(lm_loss).fisher_factors(out, y, "mc")
    with pytest.raises(ValueError, match="kind='mc' needs the likelihood"):
        fisher_vp(lambda x: x.reshape(2, 3, 4), lm_loss, out.reshape(-1), out.reshape(-1), y,
                  kind="mc")  # fmt: skip
    with pytest.raises(ValueError, match="CrossEntropyLoss, whose likelihood is 'categorical'"):
        OutputCurvature(nn.CrossEntropyLoss(), likelihood="gaussian")
    with pytest.raises(ValueError, match="likelihood must be None or one of"):
        OutputCurvature(lm_loss, likelihood="poisson")
    with pytest.raises(ValueError, match="NLLLoss"):
        OutputCurvature(nn.NLLLoss(), likelihood="categorical")
    with pytest.raises(ValueError, match="kind must be one of"):
        OutputCurvature(nn.MSELoss()).fisher_factors(out, out, "exact")
    # the classes are not in the last dim: the gradient is not a multiple of p - onehot
    square = torch.randn(2, 3, 3, dtype=DT)  # (N, C, T) with C = T: the shapes agree
    with pytest.raises(ValueError, match="not a per-position multiple"):
        OutputCurvature(
            lambda o, t: F.cross_entropy(o, t), likelihood="categorical"
        ).fisher_factors(square, torch.randint(0, 3, (2, 3)), "mc", gen(0))
    with pytest.raises(ValueError, match="not a per-position multiple"):
        OutputCurvature(
            lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), label_smoothing=0.3),
            likelihood="categorical",
        ).fisher_factors(out, y, "mc", gen(0))
    with pytest.raises(ValueError, match="weighs some positions negatively"):
        OutputCurvature(lambda o, t: -lm_loss(o, t), "categorical").fisher_factors(out, y, "mc")
    with pytest.raises(ValueError, match=r"class-index \(long\) targets of shape \(2, 3\)"):
        OutputCurvature(lm_loss, likelihood="categorical").fisher_factors(out, y.T, "mc")
