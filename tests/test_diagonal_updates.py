"""The update rules of AdaHessian and Sophia in hesse.solvers, pure functions over lists of
tensors, against formulas written out here (plain torch, no hesse code) and against
torch.optim.Adam / AdamW, in the way of optax's ``transform_test.py``. A step scaled by 1.5
or 2, a doubled ``rho``, a moved clip or a dropped bias correction changes an update here
by far more than the tolerance."""

import pytest
import torch

from hesse.optim import AdaHessian, Sophia
from hesse.solvers import (
    AdaHessianState,
    SophiaState,
    adahessian_init,
    adahessian_update,
    gnb_diagonal,
    sophia_init,
    sophia_update,
    spatial_average,
)

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-15}
SHAPES = [(3,), (2, 4)]  # two tensors: the functions work on lists


def _draws(n, seed=0, shapes=SHAPES):
    """``n`` draws of one standard normal tensor per shape."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=f64) for s in shapes] for _ in range(n)]


def _clones(ts):
    return [t.clone() for t in ts]


# -- AdaHessian ------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adahessian_update_with_abs_g_is_adam(weight_decay):
    """With the diagonal estimate |g| (and power 1) the second moment is Adam's, so the
    updates, added after the caller's decoupled weight decay, take torch.optim.Adam's
    (AdamW's) iterates."""
    lr, betas, eps = 0.05, (0.9, 0.99), 1e-8
    start = _draws(1, seed=1)[0]
    ours = _clones(start)
    theirs = [p.clone().requires_grad_() for p in start]
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    adam = cls(theirs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    state = adahessian_init(ours)
    for grads in _draws(10, seed=2):
        updates, state = adahessian_update(
            grads, [g.abs() for g in grads], state, lr=lr, betas=betas, eps=eps
        )
        for p, u in zip(ours, updates):
            p.mul_(1 - lr * weight_decay).add_(u)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        adam.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), **TOL)
    assert state.step == 10
    for p, m, v in zip(theirs, state.exp_avg, state.exp_hessian_diag_sq):
        torch.testing.assert_close(m, adam.state[p]["exp_avg"], **TOL)
        torch.testing.assert_close(v, adam.state[p]["exp_avg_sq"], **TOL)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_adahessian_update_matches_the_formula(power):
    """m, v with bias corrections 1 - beta^t over every step, the estimate D reused between
    refreshes (the Hessian delay), u = -lr m_hat / (sqrt(v_hat)^k + eps)."""
    lr, (b1, b2), eps = 0.15, (0.8, 0.95), 1e-3
    grads_seq = _draws(6, seed=3)
    diags = [[d.abs() + 0.5 for d in ds] for ds in _draws(3, seed=4)]
    state = adahessian_init([torch.zeros(s, dtype=f64) for s in SHAPES])
    m = [torch.zeros(s, dtype=f64) for s in SHAPES]
    v = [torch.zeros(s, dtype=f64) for s in SHAPES]
    for t, grads in enumerate(grads_seq, start=1):
        D = diags[(t - 1) // 2]  # refreshed every other step
        given = (_clones(grads), _clones(D))
        updates, state = adahessian_update(
            grads, D, state, lr=lr, betas=(b1, b2), eps=eps, hessian_power=power
        )
        assert state.step == t
        for j in range(len(SHAPES)):
            m[j] = b1 * m[j] + (1 - b1) * grads[j]
            v[j] = b2 * v[j] + (1 - b2) * D[j] ** 2
            m_hat, v_hat = m[j] / (1 - b1**t), v[j] / (1 - b2**t)
            expected = -lr * m_hat / (v_hat.sqrt() ** power + eps)
            torch.testing.assert_close(updates[j], expected, **TOL)
            torch.testing.assert_close(state.exp_avg[j], m[j], **TOL)
            torch.testing.assert_close(state.exp_hessian_diag_sq[j], v[j], **TOL)
            # the inputs are read, not written
            assert torch.equal(grads[j], given[0][j]) and torch.equal(D[j], given[1][j])


def test_adahessian_state_is_updated_in_place():
    """The moments are the state's own tensors, updated in place (foreach kernels): the
    new state holds them, so an optimizer that keeps them in ``self.state`` sees the new
    values. The step count is the new state's only."""
    state = adahessian_init([torch.zeros(2, dtype=f64)])
    m, v = state.exp_avg[0], state.exp_hessian_diag_sq[0]
    grads, D = [torch.tensor([1.0, -2.0], dtype=f64)], [torch.tensor([3.0, 4.0], dtype=f64)]
    _, new = adahessian_update(grads, D, state, lr=0.1)
    assert isinstance(new, AdaHessianState) and (state.step, new.step) == (0, 1)
    assert new.exp_avg[0] is m and new.exp_hessian_diag_sq[0] is v
    torch.testing.assert_close(m, 0.1 * grads[0], **TOL)
    torch.testing.assert_close(v, 0.001 * D[0] ** 2, **TOL)


def test_adahessian_half_precision_updates_round_once():
    """With bfloat16 moments the updates are float32, so adding them to a bfloat16
    parameter rounds once, as torch.optim.Adam's addcdiv_ does."""
    lr, betas = 0.1, (0.9, 0.999)
    g = torch.Generator().manual_seed(5)
    p = torch.randn(64, generator=g).bfloat16()
    grads, D = [torch.randn(64, generator=g).bfloat16()], [torch.rand(64, generator=g).bfloat16()]
    updates, state = adahessian_update(grads, D, adahessian_init([p]), lr=lr, betas=betas)
    assert updates[0].dtype == torch.float32
    denom = (state.exp_hessian_diag_sq[0] / (1 - betas[1])).sqrt() + 1e-4
    fused = p.clone().addcdiv_(state.exp_avg[0], denom, value=-lr / (1 - betas[0]))
    assert torch.equal(p.clone().add_(updates[0]), fused)


def test_spatial_average():
    """A convolution kernel's estimate becomes the mean of |d| over its spatial dimensions,
    one value per (out, in) pair; vectors and matrices are kept."""
    g = torch.Generator().manual_seed(6)
    kernel = torch.randn(3, 2, 5, 5, generator=g, dtype=f64)
    matrix, vector = torch.randn(4, 3, dtype=f64), torch.randn(4, dtype=f64)
    out = spatial_average([kernel, matrix, vector])
    for o in range(3):
        for i in range(2):
            torch.testing.assert_close(
                out[0][o, i], torch.full((5, 5), float(kernel[o, i].abs().sum() / 25), dtype=f64)
            )
    assert torch.equal(out[1], matrix) and torch.equal(out[2], vector)


# -- Sophia ----------------------------------------------------------------------------


def test_sophia_update_matches_the_clipped_formula():
    """m an EMA of g at every step; h an EMA of the estimate on the steps that pass one
    (every other step here), kept on the others; u = -clip(m / max(rho h, eps), 1). The
    draws leave some coordinates clipped and some not at every step, so that a change of
    rho and a change of the clip are both seen."""
    (b1, b2), rho, eps = (0.9, 0.8), 0.5, 1e-12
    grads_seq = _draws(6, seed=7)
    estimates = [[e.abs() for e in es] for es in _draws(6, seed=8)]
    state = sophia_init([torch.zeros(s, dtype=f64) for s in SHAPES])
    m = [torch.zeros(s, dtype=f64) for s in SHAPES]
    h = [torch.zeros(s, dtype=f64) for s in SHAPES]
    for t, grads in enumerate(grads_seq):
        estimate = estimates[t] if t % 2 == 0 else None
        before = _clones(state.hessian)
        updates, state = sophia_update(grads, state, estimate, betas=(b1, b2), rho=rho, eps=eps)
        assert state.step == t + 1
        if estimate is None:
            assert all(torch.equal(a, b) for a, b in zip(state.hessian, before))
        ratios = []
        for j in range(len(SHAPES)):
            m[j] = b1 * m[j] + (1 - b1) * grads[j]
            if estimate is not None:
                h[j] = b2 * h[j] + (1 - b2) * estimate[j]
            ratio = m[j] / torch.clamp(rho * h[j], min=eps)
            ratios.append(ratio.abs().flatten())
            expected = -torch.clamp(ratio, -1.0, 1.0)
            torch.testing.assert_close(updates[j], expected, **TOL)
            torch.testing.assert_close(state.exp_avg[j], m[j], **TOL)
            torch.testing.assert_close(state.hessian[j], h[j], **TOL)
        ratios = torch.cat(ratios)
        assert (ratios < 0.9).sum() >= 2, "some coordinates must be unclipped"
        assert (ratios > 1.1).sum() >= 2, "and some clipped"


def test_sophia_update_without_curvature_is_sign_descent():
    """With h = 0 the denominator is eps: every coordinate with m != 0 is clipped, and the
    update is -sign(m) (0 where m is 0)."""
    state = sophia_init([torch.zeros(4, dtype=f64)])
    grads = [torch.tensor([2.0, -1e-3, 0.0, 5.0], dtype=f64)]
    updates, new = sophia_update(grads, state, betas=(0.5, 0.9))
    assert isinstance(new, SophiaState)
    assert torch.equal(updates[0], torch.tensor([-1.0, 1.0, 0.0, -1.0], dtype=f64))
    assert new.exp_avg[0] is state.exp_avg[0] and torch.equal(new.hessian[0], torch.zeros(4))


def test_gnb_diagonal():
    """Gauss-Newton-Bartlett: B g * g for the sampled-label gradient of a batch of B."""
    grads = [torch.tensor([0.5, -2.0], dtype=f64), torch.tensor([[3.0]], dtype=f64)]
    out = gnb_diagonal(grads, 8)
    assert torch.equal(out[0], torch.tensor([2.0, 32.0], dtype=f64))
    assert torch.equal(out[1], torch.tensor([[72.0]], dtype=f64))


# -- the optimizers apply the functions' updates ------------------------------------------


def _spy(monkeypatch, name):
    """Record each update the optimizer gets from ``hesse.solvers.<name>``."""
    from hesse.optim import _diagonal

    seen = []
    original = getattr(_diagonal, name)

    def spy(*args, **kwargs):
        updates, state = original(*args, **kwargs)
        seen.append(_clones(updates))
        return updates, state

    monkeypatch.setattr(_diagonal, name, spy)
    return seen


@pytest.mark.parametrize(
    ("make", "name", "scale"),
    [
        (lambda p: AdaHessian(p, lr=0.1, update_each=2), "adahessian_update", 1.0),
        (lambda p: Sophia(p, lr=0.1, update_each=2), "sophia_update", 0.1),
    ],
    ids=["AdaHessian", "Sophia"],
)
def test_optimizers_add_the_updates(monkeypatch, make, name, scale):
    """Each optimizer calls the pure function once per step (one group) and moves the
    parameter by exactly the updates it returns (Sophia's times lr), bit for bit."""
    seen = _spy(monkeypatch, name)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=f64, requires_grad=True)
    opt = make([w])

    def closure():
        opt.zero_grad()
        loss = (w**4).sum() + (w[0] * w[1]) ** 2
        loss.backward()
        return loss

    for k in range(4):
        before = w.detach().clone()
        opt.step(closure)
        assert len(seen) == k + 1
        assert torch.equal(w.detach(), before.add(seen[-1][0], alpha=scale))
