"""hesse.optim against the mathematics: the iterates of each optimizer for three steps on a
small float64 problem, computed here from the textbook formulas (dense matrices, plain
torch; no hesse code), in the way of optax's ``transform_test.py``.

Where a method's rule depends on a line search, the problem and the start are chosen so
that the search accepts its first trial step, and the reference asserts that the
conditions for that hold (so a reference that no longer applies fails loudly instead of
pinning nothing). A step scaled by 1.5 or 2, a doubled ``rho`` or a doubled curvature
term changes an iterate here by far more than the tolerance.
"""

import math

import pytest
import torch

import hesse
from hesse.optim import LBFGS, AdaHessian, HessianFree, NewtonCG, Sophia, SubsampledNewton

f64 = torch.float64
STEPS = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}

# f(x) = x'Ax/2 - b'x + c sum(x^4)/4: smooth, strictly convex, not quadratic.
A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], dtype=f64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
C = 0.5
X0 = torch.tensor([1.5, -0.5, 2.0], dtype=f64)
I3 = torch.eye(3, dtype=f64)


def f(x):
    return 0.5 * x @ A @ x - B @ x + 0.25 * C * (x**4).sum()


def grad(x):
    return A @ x - B + C * x**3


def hess(x):
    return A + torch.diag(3 * C * x**2)


def _params(x0):
    """The start as two parameters (shapes (2,) and (1,)): the flat view is exercised."""
    return [x0[:2].clone().requires_grad_(), x0[2:].clone().requires_grad_()]


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def _iterates(make, fun, x0=X0, steps=STEPS, **step_kw):
    params = _params(x0)
    opt = make(params)

    def closure():
        opt.zero_grad()
        loss = fun(torch.cat([p.reshape(-1) for p in params]))
        loss.backward()
        return loss

    xs = []
    for _ in range(steps):
        opt.step(closure, **step_kw)
        xs.append(_flat(params))
    return xs, opt


def _assert_iterates(ours, ref):
    assert len(ours) == len(ref)
    for k, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k: f"iterate {k + 1}: {m}")


def _strong_wolfe_holds(x, d, alpha, c1=1e-4, c2=0.9):
    """Whether the strong Wolfe conditions hold at ``alpha``: then a strong-Wolfe search
    started there accepts it without another evaluation."""
    slope = grad(x) @ d
    decrease = f(x + alpha * d) <= f(x) + c1 * alpha * slope
    return bool(decrease) and bool(abs(grad(x + alpha * d) @ d) <= c2 * abs(slope))


# -- L-BFGS ----------------------------------------------------------------------------
def lbfgs_reference(x, steps, memory, lr=1.0, search=True):
    """L-BFGS with the dense inverse-Hessian recursion: H_0 = (s'y / y'y) I of the newest
    pair, then H <- (I - rho s y') H (I - rho y s') + rho s s' over the kept pairs, oldest
    first (equal to the two-loop recursion); first step min(1, 1/||g||_2) without pairs,
    1 with; Powell damping with B s = -alpha lr g (Nocedal & Wright, Procedure 18.2)."""
    pairs, xs = [], []
    for _ in range(steps):
        g = grad(x)
        if pairs:
            s_new, y_new = pairs[-1]
            H = (s_new @ y_new) / (y_new @ y_new) * I3
            for s, y in pairs:
                rho = 1.0 / (y @ s)
                H = (I3 - rho * torch.outer(s, y)) @ H @ (I3 - rho * torch.outer(y, s))
                H = H + rho * torch.outer(s, s)
            alpha = 1.0
        else:
            H, alpha = I3, min(1.0, 1.0 / float(torch.linalg.vector_norm(g)))
        d = -lr * (H @ g)
        assert g @ d < 0
        if search:
            assert _strong_wolfe_holds(x, d, alpha), "the reference needs the first trial"
        s = alpha * d
        x_new = x + s
        y = grad(x_new) - g
        Bs = -alpha * lr * g
        sBs, sy = s @ Bs, s @ y
        if sBs > 0 and sy < 0.2 * sBs:
            theta = 0.8 * sBs / (sBs - sy)
            y = theta * y + (1 - theta) * Bs
        assert s @ y > 0
        pairs = [*pairs, (s, y)][-memory:]
        x = x_new
        xs.append(x)
    return xs


@pytest.mark.parametrize("memory", [1, 10])
def test_lbfgs_three_iterations(memory):
    """One iteration per step (``max_iter=1``), and the same three in one step."""
    ref = lbfgs_reference(X0, STEPS, memory)
    ours, _ = _iterates(lambda p: LBFGS(p, history_size=memory, max_iter=1), f)
    _assert_iterates(ours, ref)
    one_step, _ = _iterates(lambda p: LBFGS(p, history_size=memory, max_iter=STEPS), f, steps=1)
    torch.testing.assert_close(one_step[0], ref[-1], **TOL)


def test_lbfgs_fixed_step_scales_by_lr():
    """Without a line search the step is lr times the first step (and the pair is damped
    with the lr-scaled B s)."""
    ref = lbfgs_reference(X0, STEPS, 10, lr=0.5, search=False)
    ours, _ = _iterates(lambda p: LBFGS(p, lr=0.5, max_iter=1, line_search=None), f)
    _assert_iterates(ours, ref)


def _chained_rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _minimize_iterates(method, x0, n, options):
    xs = []
    opts = {"gtol": 0.0, "ftol": 0.0, "xtol": 0.0, **options}
    hesse.minimize(
        _chained_rosenbrock,
        x0,
        method,
        max_iter=n,
        options=opts,
        callback=lambda r: xs.append(r.x.detach().clone()),
    )
    return xs


ROSEN6 = torch.tensor([-1.2, 1.0] * 3, dtype=f64)


@pytest.mark.parametrize("search", ["strong-wolfe", "wolfe", "armijo"])
def test_lbfgs_takes_the_iterates_of_minimize(search):
    """``optim.LBFGS`` and ``minimize("l-bfgs")`` with the same settings take the same
    iterates, bit for bit, on the 6-dimensional Rosenbrock function from its standard start
    (where they used to differ from the first step: f = 533.998 against 265.651)."""
    n = 25
    ref = _minimize_iterates("l-bfgs", ROSEN6, n, {"memory": 10, "line_search": search})
    assert len(ref) == n
    assert float(_chained_rosenbrock(ref[0])) == pytest.approx(265.6512379641681, rel=1e-12)
    ours, _ = _iterates(
        lambda p: LBFGS(
            p,
            history_size=10,
            max_iter=1,
            line_search=search,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        ),
        _chained_rosenbrock,
        x0=ROSEN6,
        steps=n,
    )
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a, b), f"iterate {k + 1} differs: {a} != {b}"


# -- Newton-CG ---------------------------------------------------------------------------
MARKS = {math.ceil(1.3**j) for j in range(60)}


def cg_reference(M, b, rtol, max_iter, x0=None, record=None):
    """Plain CG on M x = b from x0 (0 by default), stopped when ||r|| <= rtol ||b||, or at
    a direction of non-positive curvature (the iterate so far is returned); ``record``
    gets (i, x_i) after each iteration."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - M @ x
    p = r.clone()
    for i in range(max_iter):
        if torch.linalg.vector_norm(r) <= rtol * torch.linalg.vector_norm(b):
            break
        Mp = M @ p
        if p @ Mp <= 0:
            break
        a = (r @ r) / (p @ Mp)
        x = x + a * p
        if record is not None:
            record(i + 1, x)
        r_new = r - a * Mp
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def forcing(g):
    return min(0.5, math.sqrt(float(torch.linalg.vector_norm(g))))


def newton_cg_reference(x, steps, cg_max_iter=250):
    """Truncated Newton (N&W Algorithm 7.1): CG on H p = -g to min(0.5, sqrt||g||), then
    the first step min(1, 2.02 (f_{k-1} - f_k) / -g'p) (1 at the start)."""
    xs, last = [], None
    for _ in range(steps):
        g = grad(x)
        d = cg_reference(hess(x), -g, forcing(g), cg_max_iter)
        if not (d.abs().max() > 0 and g @ d < 0):
            d = -g
        alpha = 1.0 if last is None or last <= 0 else min(1.0, 2.02 * last / float(-(g @ d)))
        assert _strong_wolfe_holds(x, d, alpha), "the reference needs the first trial"
        x_new = x + alpha * d
        last = float(f(x) - f(x_new))
        x = x_new
        xs.append(x)
    return xs


def test_newton_cg_three_iterations():
    _assert_iterates(_iterates(NewtonCG, f)[0], newton_cg_reference(X0, STEPS))


def test_newton_cg_takes_the_iterates_of_minimize():
    n = 10
    ref = _minimize_iterates("newton-cg", ROSEN6, n, {"cg_max_iter": 120})
    assert len(ref) == n
    ours, _ = _iterates(lambda p: NewtonCG(p, cg_max_iter=120), _chained_rosenbrock, ROSEN6, n)
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a, b), f"iterate {k + 1} differs: {a} != {b}"


# -- HessianFree and SubsampledNewton ----------------------------------------------------
def damped_newton_reference(
    x, steps, damping, *, lr=1.0, warm_start=0.0, backtrack=False, cg_max_iter=100, fun=None
):
    """Hessian-free optimisation (Martens 2010) with the exact Hessian H: CG on
    (H + lam I) p = -g from warm_start times the last direction, to min(0.5, sqrt||g||);
    with ``backtrack``, the CG iterates ceil(1.3^j) are tried from the last back while f
    falls; backtracking Armijo (c1 = 1e-2) from ``lr``; lam x 3/2 when the reduction ratio
    rho = (f(x + a p) - f(x)) / (a g'p + a^2 p'Hp / 2) is below 1/4, x 2/3 above 3/4.
    Returns the iterates, the damping after each step, the ratios and the steps."""
    fun = f if fun is None else fun
    xs, lams, rhos, alphas, prev = [], [], [], [], None
    for _ in range(steps):
        fx, g, H = fun(x), grad(x), hess(x)
        x0 = warm_start * prev if warm_start > 0 and prev is not None else None
        kept = []
        p = cg_reference(
            H + damping * I3,
            -g,
            forcing(g),
            cg_max_iter,
            x0,
            record=lambda i, xi, kept=kept: kept.append(xi) if i in MARKS else None,
        )
        from_cg = bool(p.abs().max() > 0 and g @ p < 0)
        if not from_cg:
            p = -g
        if backtrack and from_cg and kept:
            candidates = [xi for xi in kept if g @ xi < 0] + [p]
            best_f, best = math.inf, candidates[-1]
            for cand in reversed(candidates):
                f_c = float(fun(x + cand))
                if not f_c < best_f:
                    break
                best_f, best = f_c, cand
            p = best
        slope = float(g @ p)
        alpha = lr
        for _ in range(30):
            f_a = float(fun(x + alpha * p))
            if f_a <= fx + 1e-2 * alpha * slope:
                break
            curv = f_a - fx - slope * alpha
            cut = -slope * alpha**2 / (2 * curv) if curv > 0 else 0.5 * alpha
            alpha = min(max(cut, 0.1 * alpha), 0.5 * alpha)
        else:
            raise AssertionError("the reference's search failed")
        pred = alpha * slope + 0.5 * alpha**2 * float(p @ H @ p)
        rho = (f_a - float(fx)) / pred
        rhos.append(rho)
        alphas.append(alpha)
        damping = damping * 1.5 if rho < 0.25 else damping * 2 / 3 if rho > 0.75 else damping
        prev = p
        x = x + alpha * p
        xs.append(x)
        lams.append(damping)
    return xs, lams, rhos, alphas


def test_hessian_free_three_iterations():
    """Warm start, CG backtracking, Armijo and Martens' damping, with the damping chosen so
    that it moves (down after a good step) and matters (1 against a Hessian of about 3)."""
    ref, lams, _, _ = damped_newton_reference(
        X0, STEPS, 1.0, warm_start=0.95, backtrack=True, cg_max_iter=100
    )
    ours, opt = _iterates(lambda p: HessianFree(p, damping=1.0, preconditioner=None), f)
    _assert_iterates(ours, ref)
    assert opt.global_state()["damping"] == pytest.approx(lams[-1], rel=1e-12)


def test_hessian_free_from_a_long_first_trial():
    """lr = 4: the Armijo search cuts the step (quadratic interpolation) before it accepts."""
    ref, lams, _, alphas = damped_newton_reference(
        X0, STEPS, 0.1, lr=4.0, warm_start=0.95, backtrack=True
    )
    assert min(alphas) < 4.0
    ours, opt = _iterates(lambda p: HessianFree(p, lr=4.0, damping=0.1, preconditioner=None), f)
    _assert_iterates(ours, ref)
    assert opt.global_state()["damping"] == pytest.approx(lams[-1], rel=1e-12)


def test_subsampled_newton_three_iterations():
    """With only parameters the subsample is the whole batch: damped CG from 0, no CG
    backtracking, Armijo from lr."""
    ref, lams, _, _ = damped_newton_reference(X0, STEPS, 0.5, cg_max_iter=50)
    ours, opt = _iterates(lambda p: SubsampledNewton(p, damping=0.5), f)
    _assert_iterates(ours, ref)
    assert opt.global_state()["damping"] == pytest.approx(lams[-1], rel=1e-12)


def test_hessian_free_reduction_ratio_is_one_on_a_quadratic(monkeypatch):
    """On a quadratic the undamped model is f itself, so the ratio of actual to predicted
    reduction is 1 at every step (to rounding), whatever the damping and the step."""
    from hesse.optim import _newton

    def quadratic(x):
        return 0.5 * x @ A @ x - B @ x

    seen = []
    original = _newton.martens_damping

    def spy(damping, rho):
        seen.append(rho)
        return original(damping, rho)

    monkeypatch.setattr(_newton, "martens_damping", spy)
    _iterates(lambda p: HessianFree(p, damping=2.0, preconditioner=None), quadratic)
    assert len(seen) == STEPS
    for rho in seen:
        assert rho == pytest.approx(1.0, abs=1e-9)


# -- AdaHessian and Sophia -----------------------------------------------------------------
# A separable function: the Hessian is diagonal, so Hutchinson's z * Hz with Rademacher z
# (z_i^2 = 1) is the exact diagonal, whatever the seed.
SA = torch.tensor([1.0, 4.0, 0.5], dtype=f64)
SB = torch.tensor([0.8, -0.3, 1.2], dtype=f64)


def sep(x):
    return (0.5 * SA * x**2 + 0.25 * x**4 - SB * x).sum()


def sep_grad(x):
    return SA * x + x**3 - SB


def sep_diag(x):
    return SA + 3 * x**2


def adahessian_reference(x, steps, lr, betas, eps, wd, k, update_each):
    """Adam with D^2 for g^2 (Yao et al. 2021): m, v with bias corrections 1 - beta^t,
    x <- x (1 - lr wd) - lr m_hat / (sqrt(v_hat)^k + eps); D refreshed every
    ``update_each`` steps and the last D used in v in between (the Hessian delay)."""
    b1, b2 = betas
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    xs = []
    for t in range(1, steps + 1):
        g = sep_grad(x)
        if (t - 1) % update_each == 0:
            D = sep_diag(x)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * D**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        x = x * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() ** k + eps)
        xs.append(x)
    return xs


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"hessian_power": 0.5, "weight_decay": 0.1},
        {"update_each": 2, "betas": (0.8, 0.9)},
    ],
    ids=["defaults", "power-decay", "delay"],
)
def test_adahessian_three_iterations(kw):
    cfg = {"lr": 0.15, "betas": (0.9, 0.999), "eps": 1e-4, "weight_decay": 0.0}
    cfg.update(hessian_power=1.0, update_each=1)
    cfg.update(kw)
    ref = adahessian_reference(
        X0,
        STEPS,
        cfg["lr"],
        cfg["betas"],
        cfg["eps"],
        cfg["weight_decay"],
        cfg["hessian_power"],
        cfg["update_each"],
    )
    ours, _ = _iterates(lambda p: AdaHessian(p, **cfg), sep)
    _assert_iterates(ours, ref)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adahessian_is_adam_when_the_curvature_is_abs_g(weight_decay):
    """For f = sum_i c_i exp(s_i x_i) with s_i = +-1 the Hessian is diagonal and equals
    |g|, so AdaHessian (power 1) is Adam (AdamW with weight decay), step for step."""
    c = torch.tensor([0.7, 1.3, 2.0], dtype=f64)
    s = torch.tensor([1.0, -1.0, 1.0], dtype=f64)

    def expo(x):
        return (c * torch.exp(s * x)).sum()

    x0 = torch.tensor([0.3, -0.2, -1.0], dtype=f64)
    kw = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": weight_decay}
    ours, _ = _iterates(lambda p: AdaHessian(p, **kw), expo, x0=x0, steps=10)
    adam_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    adam, _ = _iterates(lambda p: _NoClosure(adam_cls(p, **kw)), expo, x0=x0, steps=10)
    _assert_iterates(ours, adam)


class _NoClosure:
    """A torch.optim optimizer driven like hesse's: step(closure) evaluates, then steps."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self, closure):
        with torch.enable_grad():
            closure()
        self.opt.step()


def sophia_reference(x, steps, lr, betas, rho, weight_decay, eps, update_each):
    """Sophia (Liu et al. 2023, Algorithm 3 with Hutchinson's estimate): m an EMA of g;
    h <- beta2 h + (1 - beta2) diag(H) every ``update_each`` steps (from the first);
    x <- x (1 - lr wd) - lr clip(m / max(rho h, eps), 1). Also returns, per step, the
    smallest and the largest |m| / max(rho h, eps): below 1 a coordinate is not clipped,
    so the step depends on rho; above 1 it is, so the step depends on the clip."""
    b1, b2 = betas
    m = torch.zeros_like(x)
    h = torch.zeros_like(x)
    xs, ratios = [], []
    for t in range(steps):
        g = sep_grad(x)
        m = b1 * m + (1 - b1) * g
        if t % update_each == 0:
            h = b2 * h + (1 - b2) * sep_diag(x)
        ratio = m / torch.clamp(rho * h, min=eps)
        ratios.append((float(ratio.abs().min()), float(ratio.abs().max())))
        x = x * (1 - lr * weight_decay) - lr * ratio.clamp(-1.0, 1.0)
        xs.append(x)
    return xs, ratios


@pytest.mark.parametrize(
    "kw", [{}, {"update_each": 2, "weight_decay": 0.1}], ids=["refresh-each", "delay-decay"]
)
def test_sophia_three_iterations(kw):
    cfg = {"lr": 0.2, "betas": (0.9, 0.8), "rho": 0.25, "weight_decay": 0.0, "eps": 1e-12}
    cfg["update_each"] = 1
    cfg.update(kw)
    x0 = torch.tensor([0.6, 0.1, 2.0], dtype=f64)
    ref, ratios = sophia_reference(x0, STEPS, **cfg)
    assert max(lo for lo, _ in ratios) < 0.9, "some coordinate must be unclipped at every step"
    assert max(hi for _, hi in ratios) > 1.1, "and some clipped"
    ours, _ = _iterates(lambda p: Sophia(p, **cfg), sep, x0=x0)
    _assert_iterates(ours, ref)
