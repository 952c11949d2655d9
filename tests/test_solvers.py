"""hesse.solvers: each piece against an independent reference."""

import math

import numpy as np
import pytest
import torch

from hesse.linalg import cg
from hesse.operators import DenseOperator
from hesse.solvers import (
    ETA,
    DampedSubproblem,
    ExactSubproblem,
    LBFGSMemory,
    NielsenDamping,
    SteihaugPath,
    TrustRadius,
    TrustStep,
    armijo,
    bfgs_update,
    cholesky_newton,
    curvature_pair,
    damped_newton,
    default_tolerances,
    dfp_update,
    eigen_newton,
    escape_direction,
    escape_saddle,
    exact_step,
    initial_step,
    line_search,
    negative_curvature,
    sr1_update,
    strong_wolfe,
    update_radius,
)

f64 = torch.float64


def spd(n, seed=0, cond=100.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=f64)) @ Q.T


def sym(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=f64)
    return A + A.T


def quad_phi(A, b, x, d):
    """phi(alpha) of f(x) = x'Ax/2 - b'x along d, with its slope."""

    def phi(a):
        y = x + a * d
        return float(0.5 * y @ A @ y - b @ y), float((A @ y - b) @ d), y

    return phi


# -- line searches ----------------------------------------------------------------------
@pytest.mark.parametrize("c2", [0.9, 0.1, 0.01])
def test_strong_wolfe_conditions_hold(c2):
    A, b = spd(6, 1), torch.ones(6, dtype=f64)
    x = torch.zeros(6, dtype=f64)
    d = b.clone()  # -gradient at 0
    phi = quad_phi(A, b, x, d)
    f0, df0, _ = phi(0.0)
    for alpha0 in (1e-3, 1.0, 1e3):
        r = strong_wolfe(phi, f0, df0, alpha0, c2=c2)
        assert r.status == "wolfe"
        f, df, _ = phi(r.alpha)
        assert f <= f0 + 1e-4 * r.alpha * df0
        assert abs(df) <= c2 * abs(df0) + 1e-12


def test_weak_wolfe_accepts_a_step_past_the_minimiser():
    phi = lambda a: ((a - 1.0) ** 2, 2 * (a - 1.0), None)  # noqa: E731
    strong = strong_wolfe(phi, 1.0, -2.0, 1.95, c2=0.9)
    weak = strong_wolfe(phi, 1.0, -2.0, 1.95, c2=0.9, strong=False)
    assert weak.alpha == 1.95 and weak.nfev == 1  # slope +1.9 >= 0.9 * (-2)
    assert strong.nfev > 1 and abs(2 * (strong.alpha - 1)) <= 1.8


def test_line_searches_shrink_past_non_finite_values():
    # f = -log(1 - a) + a: the domain ends at a = 1; the minimiser is a = 0.
    def phi(a):
        if a >= 1:
            return math.nan, math.nan, None
        return -math.log(1 - a) - 2 * a, 1 / (1 - a) - 2, None

    for search in (strong_wolfe, armijo):
        r = search(phi, 0.0, -1.0, 50.0)
        assert r.accepted and 0 < r.alpha < 1 and math.isfinite(r.f) and r.f < 0


def test_line_search_refuses_an_ascent_direction():
    phi = lambda a: (a, 1.0, None)  # noqa: E731
    for search in (strong_wolfe, armijo):
        r = search(phi, 0.0, 1.0)
        assert r.status == "failed" and r.alpha == 0.0 and "descent" in r.message


def test_line_search_outcomes_are_statuses_with_advice():
    # .status says which condition the step meets ("wolfe", "armijo", "failed"); .outcome
    # says how the search ended, in the vocabulary of every hesse result.
    from hesse.linalg import Status
    from hesse.solvers import LineSearchResult

    quad = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0), None)  # noqa: E731
    ok = strong_wolfe(quad, 4.0, -4.0, c2=0.1)
    assert ok.status == "wolfe" and ok.outcome is Status.CONVERGED and ok.advice == ""
    ok = armijo(quad, 4.0, -4.0)
    assert ok.status == "armijo" and ok.outcome is Status.CONVERGED
    ascent = lambda a: (1.0 + a, 1.0, None)  # noqa: E731
    for search in (strong_wolfe, armijo):
        r = search(ascent, 1.0, 1.0)
        assert r.outcome is Status.NO_PROGRESS and "gradient correct" in r.advice
    r = armijo(ascent, 1.0, -1.0, max_evals=5)  # the slope lies: f only grows
    assert (r.status, r.outcome, r.nfev) == ("failed", Status.MAX_EVALUATIONS, 5)
    assert r.advice == "raise max_evals"
    r = strong_wolfe(ascent, 1.0, -1.0, max_evals=40)  # zooms to 0 until the budget is spent
    assert (r.status, r.outcome, r.nfev) == ("failed", Status.MAX_EVALUATIONS, 40)
    assert "40 evaluations spent" in r.message  # not "the bracket collapsed": it did not
    down = lambda a: (-a, -1.0, None)  # noqa: E731
    r = strong_wolfe(down, 0.0, -1.0, max_evals=3)  # decrease, never the curvature condition
    assert r.accepted and r.status == "armijo" and r.outcome is Status.MAX_EVALUATIONS
    lying = lambda a: ((a - 1.0) ** 2, -2.0, None)  # noqa: E731  # the slope never flattens
    r = strong_wolfe(lying, 1.0, -2.0)
    assert r.accepted and r.outcome is Status.PRECISION and "bracket collapsed" in r.message
    assert "wider dtype" in r.advice
    # constructed by hand (the positional fields of earlier versions): read from status
    assert LineSearchResult(0.0, 1.0, -1.0, None, 3, "failed", "x").outcome == "no_progress"
    assert LineSearchResult(1.0, 0.0, 0.0, None, 1, "wolfe", "x").outcome == "converged"
    with pytest.raises(
        ValueError, match="status must be 'wolfe', 'armijo', 'fixed' or 'failed', got 'ok'"
    ):
        LineSearchResult(1.0, 0.0, 0.0, None, 1, "ok", "x")


def test_armijo_interpolates_to_the_quadratic_minimiser():
    phi = lambda a: ((a - 0.3) ** 2, 2 * (a - 0.3), None)  # noqa: E731
    r = armijo(phi, 0.09, -0.6)
    assert r.nfev == 2 and r.alpha == pytest.approx(0.3)


# -- quasi-Newton -----------------------------------------------------------------------
@pytest.mark.parametrize("update", [bfgs_update, dfp_update])
def test_inverse_updates_on_a_quadratic_with_exact_line_search(update):
    """n steps with exact line searches finish a quadratic, and H is then A^{-1}
    (N&W Theorem 6.? / the conjugate-direction property of the Broyden class)."""
    n = 6
    A, b = spd(n, 2, cond=50.0), torch.arange(1.0, n + 1, dtype=f64)
    x = torch.zeros(n, dtype=f64)
    H = torch.eye(n, dtype=f64)
    g = A @ x - b
    for _ in range(n):
        d = -H @ g
        alpha = -float(g @ d) / float(d @ A @ d)
        s = alpha * d
        x = x + s
        g_new = A @ x - b
        H = update(H, s, g_new - g)
        g = g_new
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(H, torch.linalg.inv(A), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("update", [bfgs_update, dfp_update])
def test_inverse_updates_satisfy_the_secant_equation_and_stay_symmetric(update):
    g = torch.Generator().manual_seed(3)
    H = spd(5, 4)
    s, y = torch.randn(5, generator=g, dtype=f64), torch.randn(5, generator=g, dtype=f64)
    y = y if float(s @ y) > 0 else -y
    H1 = update(H, s, y)
    torch.testing.assert_close(H1 @ y, s)
    torch.testing.assert_close(H1, H1.T)
    assert float(torch.linalg.eigvalsh(H1).min()) > 0


def test_sr1_secant_skip_and_indefiniteness():
    B = torch.eye(3, dtype=f64)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=f64)
    y = torch.tensor([-2.0, 0.0, 0.0], dtype=f64)  # negative curvature along s
    B1 = sr1_update(B, s, y)
    torch.testing.assert_close(B1 @ s, y)
    assert float(torch.linalg.eigvalsh(B1).min()) == pytest.approx(-2.0)
    assert sr1_update(B, s, B @ s) is B  # y - Bs = 0: skipped


def test_lbfgs_two_loop_equals_bfgs_from_the_same_pairs():
    """With H0 = gamma I (gamma of the newest pair), the two-loop recursion applies exactly
    the BFGS matrix built from the stored pairs (N&W Algorithm 7.4)."""
    g = torch.Generator().manual_seed(5)
    A = spd(7, 6)
    mem = LBFGSMemory(size=4)
    pairs = []
    for _ in range(6):
        s = torch.randn(7, generator=g, dtype=f64)
        pairs.append((s, A @ s))
        mem.push(s, A @ s)
    kept = pairs[-4:]
    s_new, y_new = kept[-1]
    H = float(s_new @ y_new) / float(y_new @ y_new) * torch.eye(7, dtype=f64)
    for s, y in kept:
        H = bfgs_update(H, s, y)
    v = torch.randn(7, generator=g, dtype=f64)
    torch.testing.assert_close(mem.apply(v), H @ v)
    torch.testing.assert_close(mem.direction(v), -(H @ v))
    assert len(mem) == 4


def test_lbfgs_memory_first_step_and_update():
    """The L-BFGS descent both front ends call: min(1, 1/||g||_2) without pairs, 1 with;
    a pair with s'y <= 0 and no B s is not kept, a damped one is."""
    g = torch.tensor([3.0, 4.0], dtype=f64)
    mem = LBFGSMemory(size=2)
    assert mem.first_step(g) == initial_step(g) == pytest.approx(0.2)
    assert initial_step(g / 10) == 1.0
    s = torch.tensor([1.0, 0.0], dtype=f64)
    assert not mem.update(s, -s) and len(mem) == 0
    assert mem.update(s, -s, 2 * s) and len(mem) == 1  # Powell-damped: s'r = 0.2 s'Bs
    assert float(mem.s[0] @ mem.y[0]) == pytest.approx(0.2 * 2.0)
    assert mem.first_step(g) == 1.0


def test_line_search_by_name():
    def phi(a):
        return (a - 2.0) ** 2, 2 * (a - 2.0), a

    for kind, direct in (
        ("strong-wolfe", lambda: strong_wolfe(phi, 4.0, -4.0, 0.5, c2=0.1)),
        ("wolfe", lambda: strong_wolfe(phi, 4.0, -4.0, 0.5, c2=0.1, strong=False)),
        ("armijo", lambda: armijo(phi, 4.0, -4.0, 0.5)),
    ):
        assert line_search(kind, phi, 4.0, -4.0, 0.5, c2=0.1) == direct()
    with pytest.raises(ValueError, match="line search must be one of"):
        line_search("exact", phi, 4.0, -4.0)


def test_curvature_pair_damping_and_skipping():
    s = torch.tensor([1.0, 0.0], dtype=f64)
    y = torch.tensor([-1.0, 0.5], dtype=f64)  # s'y < 0
    Bs = torch.tensor([2.0, 0.0], dtype=f64)
    s1, r = curvature_pair(s, y, Bs)
    assert float(s1 @ r) == pytest.approx(0.2 * float(s @ Bs))  # Powell: s'r = 0.2 s'Bs
    assert curvature_pair(s, y, Bs, damping=False) is None
    s2, y2 = curvature_pair(s, -y, Bs)  # enough curvature: unchanged
    assert torch.equal(s2, s) and torch.equal(y2, -y)


# -- Newton corrections -----------------------------------------------------------------
def test_newton_corrections_on_an_indefinite_matrix():
    H = sym(6, 7)
    g = torch.linspace(-1, 1, 6, dtype=f64)
    evals, Q = torch.linalg.eigh(H)
    assert evals.min() < 0 < evals.max()
    flip = eigen_newton(H, g, "eigen-flip")
    torch.testing.assert_close(flip.direction, -(Q @ ((Q.T @ g) / evals.abs())))
    clip = eigen_newton(H, g, "eigen-clip")
    assert flip.min_eigenvalue == pytest.approx(float(evals[0]))
    assert not flip.positive_definite
    chol = cholesky_newton(H, g)
    assert chol.shift > -float(evals[0])
    torch.testing.assert_close(
        chol.direction, -torch.linalg.solve(H + chol.shift * torch.eye(6, dtype=f64), g)
    )
    for step in (flip, clip, chol):
        assert float(step.direction @ g) < 0  # descent
    assert damped_newton(H, g, 0.0) is None  # not positive definite
    mu = 1.0 - float(evals[0])
    torch.testing.assert_close(
        damped_newton(H, g, mu).direction, -torch.linalg.solve(H + mu * torch.eye(6, dtype=f64), g)
    )


def test_newton_on_a_positive_definite_matrix_is_plain_newton():
    A, g = spd(5, 8), torch.ones(5, dtype=f64)
    exact = -torch.linalg.solve(A, g)
    for step in (eigen_newton(A, g), eigen_newton(A, g, "eigen-clip"), cholesky_newton(A, g)):
        torch.testing.assert_close(step.direction, exact)
    assert cholesky_newton(A, g).shift == 0.0


def test_singular_hessian_gets_a_finite_step():
    H = torch.diag(torch.tensor([1.0, 0.0], dtype=f64))
    d = eigen_newton(H, torch.tensor([1.0, 1.0], dtype=f64)).direction
    assert torch.isfinite(d).all() and float(d[1]) < -1e6


# -- trust regions ----------------------------------------------------------------------
def _brute_force_tr(B, g, radius, n_angles=200001):
    """2-D: the subproblem's minimum on a fine grid of the disc's boundary and interior."""
    Bn, gn = B.numpy(), g.numpy()
    t = np.linspace(0, 2 * np.pi, n_angles)
    P = radius * np.stack([np.cos(t), np.sin(t)])
    vals = gn @ P + 0.5 * np.einsum("in,ij,jn->n", P, Bn, P)
    best = vals.min()
    w, _ = np.linalg.eigh(Bn)
    if w.min() > 0:
        p = -np.linalg.solve(Bn, gn)
        if np.linalg.norm(p) <= radius:
            best = min(best, gn @ p + 0.5 * p @ Bn @ p)
    return best


@pytest.mark.parametrize(
    "B,g",
    [
        ([[2.0, 0.0], [0.0, 1.0]], [1.0, 1.0]),  # interior solution for a large radius
        ([[1.0, 0.0], [0.0, -2.0]], [1.0, 0.5]),  # indefinite
        ([[1.0, 0.0], [0.0, -2.0]], [1.0, 0.0]),  # the hard case
        ([[-1.0, 0.3], [0.3, -0.5]], [0.2, -0.1]),  # negative definite
        ([[0.0, 0.0], [0.0, 0.0]], [1.0, 2.0]),  # zero curvature
    ],
)
@pytest.mark.parametrize("radius", [0.1, 1.0, 10.0])
def test_exact_trust_region_step_is_the_global_minimiser(B, g, radius):
    B, g = torch.tensor(B, dtype=f64), torch.tensor(g, dtype=f64)
    step = exact_step(B, g, radius)
    p = step.step
    value = float(g @ p + 0.5 * p @ B @ p)
    assert float(p.norm()) <= radius * (1 + 1e-9)
    assert value <= _brute_force_tr(B, g, radius) + 1e-8 * max(1.0, radius**2)
    assert step.predicted == pytest.approx(-value, rel=1e-9, abs=1e-12)


def test_steihaug_path_matches_cg_and_reuses_products():
    A, b = spd(20, 9, cond=1e3), torch.ones(20, dtype=f64)
    full = cg(A, b, rtol=1e-10, max_iter=100)
    path = SteihaugPath(A, -b, rtol=1e-10, max_iter=100)
    big = path.step(1e6)
    torch.testing.assert_close(big.step, full.x)
    assert not big.on_boundary
    assert big.predicted == pytest.approx(-full.model)
    used = path.products
    for radius in (1.0, 0.1, 1e-3):  # a rejected step: the same path, cut earlier
        s = path.step(radius)
        assert s.on_boundary and float(s.step.norm()) == pytest.approx(radius)
        model = float(-b @ s.step + 0.5 * s.step @ A @ s.step)
        assert s.predicted == pytest.approx(-model, rel=1e-9)
    assert path.products == used


def test_steihaug_follows_negative_curvature_to_the_boundary():
    B = torch.diag(torch.tensor([-1.0, 2.0], dtype=f64))
    s = SteihaugPath(B, torch.tensor([1.0, 1.0], dtype=f64), rtol=1e-8, max_iter=10).step(3.0)
    assert s.on_boundary and float(s.step.norm()) == pytest.approx(3.0)
    assert s.min_eigenvalue is not None and s.min_eigenvalue < 0


def test_radius_update():
    assert update_radius(1.0, 0.1, 1.0, True, 10.0) == 0.5
    assert update_radius(1.0, math.nan, 0.4, False, 10.0) == 0.2
    assert update_radius(1.0, 0.9, 1.0, True, 10.0) == 2.0
    assert update_radius(8.0, 0.9, 8.0, True, 10.0) == 10.0
    assert update_radius(1.0, 0.9, 0.5, False, 10.0) == 1.0
    assert update_radius(1.0, 0.5, 1.0, True, 10.0) == 1.0


def test_damped_subproblem_solves_the_trust_region_of_its_own_length():
    B, g = sym(5, 11), torch.linspace(-1.0, 2.0, 5, dtype=f64)
    lam1 = float(np.linalg.eigvalsh(B.numpy())[0])
    assert lam1 < 0
    sub = DampedSubproblem(B, g)
    assert sub.step(-lam1 - 0.1) is None  # B + mu I indefinite: no step of that size
    for mu in (-lam1 + 0.05, -lam1 + 1.0, -lam1 + 50.0):
        s = sub.step(mu)
        p = np.linalg.solve(B.numpy() + mu * np.eye(5), -g.numpy())  # the LM step, by hand
        np.testing.assert_allclose(s.step.numpy(), p, rtol=1e-9, atol=1e-12)
        assert s.predicted == pytest.approx(-(g.numpy() @ p + 0.5 * p @ B.numpy() @ p), rel=1e-9)
        # N&W Theorem 4.1: -(B + mu I)^-1 g with B + mu I > 0 solves the subproblem of
        # radius |p| (what makes Levenberg-Marquardt a trust region with mu for the radius).
        exact = exact_step(B, g, float(np.linalg.norm(p)))
        torch.testing.assert_close(exact.step, s.step, rtol=1e-6, atol=1e-9)
    assert sub.initial_damping() == pytest.approx(1e-3 * float(B.diagonal().abs().max()))


@pytest.mark.parametrize("make", ["steihaug", "exact"])
def test_trust_subproblems_share_one_interface(make):
    B, g = sym(6, 12), torch.linspace(-1.0, 1.0, 6, dtype=f64)
    if make == "steihaug":
        sub = SteihaugPath(B, g, rtol=1e-10, max_iter=50)
    else:
        sub = ExactSubproblem(B, g)
    for radius in (2.0, 0.5, 0.01):
        s = sub.step(radius)
        assert isinstance(s, TrustStep)
        assert float(s.step.norm()) <= radius * (1 + 1e-9)
        model = float(g @ s.step + 0.5 * s.step @ B @ s.step)
        assert s.predicted == pytest.approx(-model, rel=1e-9) and s.predicted > 0
    if make == "exact":
        torch.testing.assert_close(sub.step(0.5).step, exact_step(B, g, 0.5).step)


def test_size_rules():
    r = TrustRadius(1.0, 3.0)
    assert r.size(None) == 1.0 and r.threshold == ETA
    assert not r.accepts(ETA) and r.accepts(ETA + 1e-12)
    r.update(0.9, 1.0, True)  # good and at the boundary: grow
    assert r.size(None) == 2.0
    r.update(0.9, 2.0, True)  # capped at max_radius
    assert r.size(None) == 3.0
    r.update(math.nan, 0.4, False)  # a failed trial: half the step
    assert r.size(None) == 0.2 and r.exhausted(1.0, 1e-8) is None
    assert "shrank" in r.exhausted(1.0, 0.1)  # 0.2 <= 0.1 (1 + 1)

    d = NielsenDamping()
    B = torch.diag(torch.tensor([4.0, -8.0], dtype=f64))
    assert d.size(DampedSubproblem(B, torch.ones(2, dtype=f64))) == pytest.approx(8e-3)
    assert not d.accepts(0.0) and d.accepts(1e-12)
    d.update(-math.inf, 0.0, False)  # failure: mu nu, nu doubled
    assert (d.mu, d.nu) == (pytest.approx(16e-3), 4.0)
    d.update(0.5, 1.0, False)  # success at rho = 1/2: factor max(1/3, 1 - 0) = 1, nu = 2
    assert (d.mu, d.nu) == (pytest.approx(16e-3), 2.0)
    d.update(1.0, 1.0, False)  # rho = 1: factor max(1/3, 0) = 1/3
    assert d.mu == pytest.approx(16e-3 / 3) and d.exhausted(0.0, 1e-8) is None
    d.mu = math.inf
    assert "damping" in d.exhausted(0.0, 1e-8)


# -- saddles ----------------------------------------------------------------------------
def _saddle_matrix(n=5, seed=13):
    """A symmetric matrix with eigenvalues -1 (the most negative), -0.5 and positives."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    lam = torch.tensor([2.0, -1.0, 3.0, -0.5, 0.7][:n], dtype=f64)
    return Q @ torch.diag(lam) @ Q.T


@pytest.mark.parametrize("dense", [True, False])
def test_negative_curvature_is_the_most_negative_eigenpair(dense):
    A = _saddle_matrix()
    w, V = np.linalg.eigh(A.numpy())
    lam, v = negative_curvature(A if dense else DenseOperator(A))  # Lanczos: full Krylov
    assert lam == pytest.approx(w[0], abs=1e-8) and w[0] == pytest.approx(-1.0)
    assert float(v.norm()) == pytest.approx(1.0)
    assert abs(float(v.numpy() @ V[:, 0])) == pytest.approx(1.0, abs=1e-6)  # up to sign


@pytest.mark.parametrize("k", [1.0, 0.01, 1.9997])  # 1.9997: t = 1/2 passes only if c = 1e-4
def test_escape_from_a_saddle_of_a_quartic(k):
    # f(x) = (x-c)'A(x-c)/2 + k ((x-c)'q)^4, q the eigenvector of A's eigenvalue -1: a
    # saddle at c, |c| = 16, so the first trial step is sqrt(16) = 4. Along q,
    # f(c + t q) - f(c) = -t^2/2 + k t^4, and the step is accepted when that is below
    # -1e-4 t^2 / 2, i.e. t^2 < (1 - 1e-4) / (2k): the first of 4, 2, 1, ... that is.
    A = _saddle_matrix()
    q = torch.from_numpy(np.linalg.eigh(A.numpy())[1][:, 0])
    c = torch.full((5,), 16.0 / math.sqrt(5), dtype=f64)

    def f(x):
        y = x - c
        return float(0.5 * y @ A @ y + k * (y @ q) ** 4)

    calls = []

    def phi(x):
        calls.append(x)
        return f(x), len(calls)

    lam, v = negative_curvature(A)
    out = escape_saddle(phi, c, f(c), torch.zeros(5, dtype=f64), lam, v)
    halvings = max(0, math.ceil(math.log2(4.0 / math.sqrt((1 - 1e-4) / (2 * k)))))
    assert out.step == pytest.approx(4.0 * 0.5**halvings, rel=1e-12)
    assert out.trials == halvings + 1 == len(calls)
    assert abs(float(out.direction @ q)) == pytest.approx(1.0)  # the eigenvector, up to sign
    torch.testing.assert_close(calls[-1], c + out.step * out.direction)
    assert out.value == f(calls[-1]) < f(c) and out.payload == len(calls)


def test_escape_direction_sign_non_finite_trials_and_failure():
    v = torch.tensor([0.0, 1.0], dtype=f64)
    assert torch.equal(escape_direction(torch.tensor([1.0, 0.5], dtype=f64), v), -v)
    assert torch.equal(escape_direction(torch.tensor([1.0, -0.5], dtype=f64), v), v)
    assert torch.equal(escape_direction(torch.zeros(2, dtype=f64), v), v)
    x0 = torch.zeros(2, dtype=f64)

    def phi(x):  # f = -t^2 / 2 along v, but not finite beyond t = 0.3
        t = float(x[1])
        return (math.nan if t > 0.3 else -0.5 * t * t), None

    out = escape_saddle(phi, x0, 0.0, x0, -1.0, v)
    assert out.step == 0.25 and out.trials == 3
    assert escape_saddle(lambda x: (1.0, None), x0, 0.0, x0, -1.0, v, max_halvings=5) is None


def test_cg_reports_the_model_value():
    A, b = spd(8, 10), torch.ones(8, dtype=f64)
    for kw in ({}, {"max_iter": 3}, {"radius": 0.05}, {"x0": torch.full((8,), 0.3, dtype=f64)}):
        r = cg(A, b, **kw)
        assert r.model == pytest.approx(float(0.5 * r.x @ A @ r.x - b @ r.x), rel=1e-10)


def test_default_tolerances_follow_the_dtype():
    t64, t32 = default_tolerances(torch.float64), default_tolerances(torch.float32)
    assert t64.gtol < 1e-5 < t32.gtol < 1e-2
    assert t64.ftol < t32.ftol


# -- the one-probe Hutchinson diagonal ------------------------------------------------------
def test_rademacher_like_draws_each_tensor_in_order():
    from hesse._core._random import rademacher
    from hesse.solvers import rademacher_like

    like = [torch.zeros(3, 4, dtype=torch.float32), torch.zeros(5, dtype=f64)]
    zs = rademacher_like(like, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    refs = [rademacher(t.shape, dtype=t.dtype, device=t.device, generator=g) for t in like]
    assert all(z.dtype == t.dtype and torch.equal(z, r) for z, t, r in zip(zs, like, refs))


def test_hutchinson_probe_and_linalg_estimator_agree_probe_for_probe():
    # One kernel, z ⊙ Hz, and one draw: with the same generator the solvers' s-probe mean
    # and hesse.linalg's estimator (one probe per product) see the same signs. An integer
    # matrix keeps every sum exact, so the two averages are equal, not close.
    from hesse.linalg import hutchinson_diagonal
    from hesse.solvers import hutchinson_diagonal_probe

    H = torch.randint(-5, 6, (7, 7), generator=torch.Generator().manual_seed(0)).to(f64)
    H = H + H.T
    for s, batch in ((2, 1), (4, 2), (8, 8)):  # batch means and merges by powers of two
        probe = hutchinson_diagonal_probe(
            lambda z: [H @ z[0]], [torch.zeros(7, dtype=f64)], torch.Generator().manual_seed(4), s
        )[0]
        g = torch.Generator().manual_seed(4)
        est = hutchinson_diagonal(H, s, generator=g, batch_size=batch)
        assert torch.equal(probe, est.estimate)


def test_hutchinson_probe_is_the_mean_of_probe_steps():
    from hesse.linalg._diag import probe_diagonal
    from hesse.solvers import hutchinson_diagonal_probe, rademacher_like

    H = spd(5, 3)
    like = [torch.zeros(2, dtype=f64), torch.zeros(3, dtype=f64)]

    def hvp(z):
        return list((H @ torch.cat(z)).split([2, 3]))

    one = hutchinson_diagonal_probe(hvp, like, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert all(map(torch.equal, one, probe_diagonal(hvp, rademacher_like(like, g))))
    three = hutchinson_diagonal_probe(hvp, like, torch.Generator().manual_seed(1), samples=3)
    g = torch.Generator().manual_seed(1)
    steps = [probe_diagonal(hvp, rademacher_like(like, g)) for _ in range(3)]
    for k in range(2):
        torch.testing.assert_close(three[k], sum(st[k] for st in steps) / 3, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="samples must be an integer >= 1, got 0"):
        hutchinson_diagonal_probe(hvp, like, g, samples=0)


# ------------------------------------------------ the fixed step, approximate Armijo
def test_fixed_step_takes_the_step_where_it_is_finite():
    from hesse.linalg import Status
    from hesse.solvers import fixed_step, line_search

    quad = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0), a)  # noqa: E731
    r = fixed_step(quad, 4.0, -4.0, 5.0)  # f rises (9 > 4): no condition is tested
    assert (r.status, r.alpha, r.f, r.payload, r.nfev) == ("fixed", 5.0, 9.0, 5.0, 1)
    assert r.accepted and r.outcome is Status.CONVERGED
    assert line_search(None, quad, 4.0, -4.0, 0.5).alpha == 0.5
    nan = lambda a: (math.nan, math.nan, None)  # noqa: E731
    r = fixed_step(nan, 4.0, -4.0, 1.0)
    assert not r.accepted and r.outcome is Status.NON_FINITE and r.alpha == 0.0
    assert fixed_step(quad, 4.0, 1.0).outcome is Status.NO_PROGRESS  # not a descent slope


def test_armijo_judges_a_step_at_f_rounding_by_its_slope():
    """Hager & Zhang's approximate condition: phi(alpha) within f's rounding of phi(0),
    phi'(alpha) <= (2 c1 - 1) phi'(0)."""
    ulp = 2.0**-52
    df0, c1 = -1e-14, 1e-2
    bound = (2 * c1 - 1) * df0  # 0.98e-14

    def phi_at(f, slope_at_1):
        # phi(1) = f; a slope that falls linearly from df0 at 0 to slope_at_1 at 1
        return lambda a: (f if a == 1.0 else 1.0, df0 + a * (slope_at_1 - df0), a)

    # f one rounding above phi(0): plain Armijo fails, the slopes' model accepts the step
    r = armijo(phi_at(1.0 + ulp, 0.0), 1.0, df0, 1.0, c1=c1)
    assert r.accepted and r.alpha == 1.0 and r.nfev == 1 and "rounding" in r.message
    r = armijo(phi_at(1.0 + 50 * ulp, 0.97e-14), 1.0, df0, 1.0, c1=c1)  # just within
    assert r.accepted and r.alpha == 1.0
    r = armijo(phi_at(1.0 + 50 * ulp, 0.99e-14), 1.0, df0, 1.0, c1=c1)  # just past
    assert r.alpha != 1.0
    assert 0.97e-14 <= bound <= 0.99e-14
    # beyond f's rounding the value decides, whatever the slope
    r = armijo(phi_at(1.0 + 200 * ulp, 0.0), 1.0, df0, 1.0, c1=c1)
    assert r.alpha != 1.0
    # a float32 function's band is 10 of float32's roundings: 5 are within, 20 not
    from hesse.solvers._linesearch import FLOAT32_ROUNDING

    ulp32, band = 2.0**-23, FLOAT32_ROUNDING
    r = armijo(phi_at(1.0 + 5 * ulp32, 0.0), 1.0, df0, 1.0, c1=c1, rounding=band)
    assert r.accepted and r.alpha == 1.0
    assert armijo(phi_at(1.0 + 5 * ulp32, 0.0), 1.0, df0, 1.0, c1=c1).alpha != 1.0
    assert armijo(phi_at(1.0 + 20 * ulp32, 0.0), 1.0, df0, 1.0, c1=c1, rounding=band).alpha != 1.0


def test_search_iteration_allows_for_the_rounding_of_the_points_dtype():
    """A float32 point's Armijo search judges values within float32's rounding of f by
    their slopes (a float64 point's by float64's; a bfloat16 point's too: 100 of its own
    roundings would be 78% of f)."""
    from hesse.solvers import NewtonDescent, Point, search_iteration

    cases = ((torch.float32, True), (torch.float64, False), (torch.bfloat16, False))
    for dtype, accepted in cases:
        x0 = torch.zeros(1, dtype=dtype)
        g0 = torch.tensor([-1e-3], dtype=dtype)

        def evaluate(x, dtype=dtype):  # f up by 5 float32 roundings, slope now +0.5e-3
            return Point(x, 1.0 + 5 * 2.0**-23, g=torch.tensor([0.5e-3], dtype=dtype))

        pt = Point(x0, 1.0, g=g0)
        d = torch.ones(1, dtype=dtype)
        it = search_iteration(
            pt, NewtonDescent(d, -5e-4, lambda v: v * 1e-3), evaluate, "armijo", c1=1e-2,
            retry=False,
        )  # fmt: skip
        assert (it.accepted and it.alpha == 1.0) == accepted, dtype


# ------------------------------------------------------------------ one iteration
def _quadratic(A):
    from hesse.solvers import Point

    def evaluate(x):
        return Point(x, float(x @ A @ x) / 2, g=A @ x)

    return evaluate


def test_search_iteration_l_bfgs_by_hand():
    """Two iterations of LBFGSDescent + strong Wolfe equal the same calls made by hand."""
    from hesse.solvers import LBFGSDescent, initial_step, line_search, search_iteration

    A = torch.diag(torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64))
    evaluate = _quadratic(A)
    pt = evaluate(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    mem = LBFGSMemory(size=3)
    descent = LBFGSDescent(mem)
    ref_mem = LBFGSMemory(size=3)
    x = pt.x
    for k in range(2):
        g = A @ x
        d = ref_mem.direction(g)
        phi = lambda a, x=x, d=d: (  # noqa: E731
            float((x + a * d) @ A @ (x + a * d)) / 2,
            float((A @ (x + a * d)) @ d),
            None,
        )
        first = initial_step(g) if k == 0 else 1.0
        ls = line_search("strong-wolfe", phi, float(x @ A @ x) / 2, float(g @ d), first)
        x_new = x + ls.alpha * d
        ref_mem.update(ls.alpha * d, A @ x_new - g, -ls.alpha * g)
        it = search_iteration(pt, descent, evaluate)
        assert it.accepted and not it.restarted and it.alpha == ls.alpha
        torch.testing.assert_close(it.point.x, x_new, rtol=0, atol=0)
        x, pt = x_new, it.point
    assert len(mem) == 2 and all(torch.equal(a, b) for a, b in zip(mem.s, ref_mem.s))


class _Recorder:
    """A descent with a fixed direction that records what the iteration asks of it."""

    def __init__(self, d, first=1.0):
        self.d, self.first = d, first
        self.calls = []

    def direction(self, pt):
        self.calls.append("direction")
        return self.d

    def steepest(self, pt):
        return -pt.g

    def first_step(self, pt, d):
        self.calls.append(("first_step", d.tolist()))
        return self.first

    def update(self, old, new, alpha, d):
        self.calls.append(("update", alpha, d.tolist()))

    def reset(self):
        self.calls.append("reset")


def test_search_iteration_restarts_retries_and_scales():
    from hesse.solvers import search_iteration

    A = torch.eye(2, dtype=torch.float64)
    evaluate = _quadratic(A)
    pt = evaluate(torch.tensor([1.0, 0.0], dtype=torch.float64))
    # an ascent direction: reset, then steepest descent
    rec = _Recorder(torch.tensor([1.0, 0.0], dtype=torch.float64))
    it = search_iteration(pt, rec, evaluate, "armijo")
    assert it.restarted and it.d.tolist() == [-1.0, 0.0] and it.alpha == 1.0
    assert rec.calls == [
        "direction",
        "reset",
        ("first_step", [-1.0, 0.0]),
        ("update", 1.0, [-1.0, 0.0]),
    ]
    # a descent direction along which the search fails (f is not finite off the first
    # axis): with retry, reset and once more along -g; without, a failed iteration
    from hesse.solvers import Point

    def domain(x):
        return evaluate(x) if x[1] == 0 else Point(x, math.nan)

    d = torch.tensor([-1.0, 5.0], dtype=torch.float64)
    rec = _Recorder(d)
    it = search_iteration(pt, rec, domain, "armijo")
    assert it.restarted and it.accepted and it.d.tolist() == [-1.0, 0.0]
    assert rec.calls[:2] == ["direction", ("first_step", d.tolist())]
    assert rec.calls[2:] == ["reset", ("first_step", [-1.0, 0.0]), ("update", 1.0, [-1.0, 0.0])]
    rec = _Recorder(d)
    it = search_iteration(pt, rec, domain, "armijo", retry=False)
    assert not it.accepted and it.point is None and "reset" not in rec.calls
    # the first trial step is scale * first_step; a fixed step takes it as it is
    it = search_iteration(pt, _Recorder(-pt.g, first=0.25), evaluate, None, scale=2.0)
    assert it.alpha == 0.5 and it.search.status == "fixed"
    torch.testing.assert_close(it.point.x, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert it.step_norm == 0.5


def test_lbfgs_descent_scales_per_block():
    from hesse.solvers import LBFGSDescent, Point

    mem = LBFGSMemory(size=2)
    mem.push(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    scale = torch.tensor([0.5, 3.0])
    desc = LBFGSDescent(mem, scale)
    pt = Point(torch.zeros(2), 0.0, g=torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(desc.direction(pt), mem.direction(pt.g) * scale)
    torch.testing.assert_close(desc.steepest(pt), torch.tensor([-1.0, -3.0]))
    new = Point(torch.zeros(2), 0.0, g=torch.tensor([1.0, 0.5]))
    d = desc.direction(pt)
    desc.update(pt, new, 0.5, d)  # the pair of the step 0.5 d, with B s = -0.5 scale * g
    torch.testing.assert_close(mem.s[-1], 0.5 * d)
    torch.testing.assert_close(mem.y[-1], new.g - pt.g)
    desc.reset()
    assert len(mem) == 0


def test_newton_descent_ratio_and_steepest_model():
    from hesse.solvers import NewtonDescent, repeat_decrease_step, search_iteration

    A = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    evaluate = _quadratic(A)
    pt = evaluate(torch.tensor([1.0, -2.0], dtype=torch.float64))
    g = pt.g
    d = -torch.linalg.solve(A, g)
    q = float(g @ d) + 0.5 * float(d @ A @ d)
    desc = NewtonDescent(d, q, lambda v: A @ v)
    it = search_iteration(pt, desc, evaluate, "armijo", retry=False)
    # the quadratic model is f itself: the full step, actual = predicted reduction
    assert it.alpha == 1.0 and abs(desc.ratio(pt, it) - 1.0) < 1e-12
    assert desc.last_decrease == pt.f - it.point.f and it.point.f < 1e-30
    # a step half as long: m(1/2) = g'd/2 + d'Ad/8 = 3/4 of the full reduction
    half = search_iteration(pt, NewtonDescent(d, q), evaluate, None, scale=0.5)
    assert abs(NewtonDescent(d, q).ratio(pt, half) - 1.0) < 1e-12
    # -g in place of a direction that is not a descent: its own model value
    up = NewtonDescent(-d, q, lambda v: A @ v)
    it = search_iteration(pt, up, evaluate, "armijo", retry=False)
    assert it.restarted and torch.equal(up.d, -g)
    assert up.q == pytest.approx(-float(g @ g) + 0.5 * float(g @ A @ g), rel=1e-15)
    # the first step: 1, or the step repeating the last decrease (capped at 1)
    slope = float(g @ d)
    rep = NewtonDescent(d, q, repeat_decrease=True, last_decrease=0.01)
    assert rep.first_step(pt, d) == repeat_decrease_step(0.01, slope, 1.0, cap=1.0) < 1.0
    assert NewtonDescent(d, q).first_step(pt, d) == 1.0
    failed = search_iteration(pt, NewtonDescent(d, q), evaluate, "armijo", retry=False, d=-d)
    assert failed.restarted  # the given direction was an ascent: -g instead
    assert NewtonDescent(d, q).ratio(pt, _failed_iteration(pt, d)) == -math.inf


def _failed_iteration(pt, d):
    from hesse.solvers import Iteration, LineSearchResult

    ls = LineSearchResult(0.0, pt.f, -1.0, None, 3, "failed", "no decrease")
    return Iteration(ls, d, -1.0, False)
