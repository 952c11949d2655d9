"""The three loops every method runs in: a line search along a direction, a trust region
around a model, and Nesterov's accelerated gradient."""

from __future__ import annotations

import math

import torch

from hesse._minimize._directions import Direction, InverseUpdate, Newton
from hesse._minimize._run import Run, Stop
from hesse.solvers import (
    ETA,
    SteihaugPath,
    armijo,
    damped_newton,
    exact_step,
    forcing_rtol,
    initial_step,
    line_search,
    lm_damping,
    sr1_update,
    update_radius,
)


def _stationary(run: Run, pt, graph: bool, H=None):
    """At a point that passes the gradient test: the point to go on from (after leaving a
    saddle), or ``None`` when it is a solution."""
    neg = run.negative_curvature(pt, H)
    if neg is None:
        return None
    return run.escape(pt, *neg, graph)


def line_search_loop(run: Run, direction: Direction, x0, options: dict):
    """Direction + line search, until a test passes."""
    graph = direction.needs_graph
    search = options["line_search"]
    c1, c2 = options["c1"], options["c2"]
    pt = run.first(x0, graph)
    run.record(pt)
    fallback = False  # after a failed search: one more try along -g before giving up
    while True:
        if run.converged(pt):
            H = run.obj.hessian(pt) if isinstance(direction, Newton) and run.saddle_check else None
            nxt = _stationary(run, pt, graph, H)
            if nxt is None:
                raise Stop("converged", "the gradient norm is below the tolerance")
            pt = nxt
            direction.reset()
            continue
        d = -pt.g if fallback else direction.compute(pt)
        slope = float(torch.dot(pt.g, d))
        if not slope < 0 or not math.isfinite(slope):  # lost descent (rounding): restart
            direction.reset()
            d = -pt.g
            slope = -float(torch.dot(pt.g, pt.g))
        x = pt.x

        def phi(alpha: float, x=x, d=d):
            trial = run.evaluate(x + alpha * d, graph)
            df = float(torch.dot(trial.g, d)) if trial.finite else math.nan
            return trial.f, df, trial

        ls = line_search(search, phi, pt.f, slope, direction.first_step(pt, d), c1=c1, c2=c2)
        if not ls.accepted:
            if not fallback and not torch.equal(d, -pt.g):
                direction.reset()
                fallback = True
                continue
            raise Stop("no_progress", f"the line search failed: {ls.message}")
        fallback = False
        new = ls.payload
        direction.update(pt, new, ls.alpha, d)
        if isinstance(direction, InverseUpdate):
            run.hess_inv = direction.H
        old, pt = pt, new
        run.after_step(old, pt, ls.alpha * float(torch.linalg.vector_norm(d)))


def trust_region_loop(run: Run, method: str, x0, options: dict):
    """Model + trust region (trust-ncg, trust-exact, sr1) or adaptive damping (newton with
    ``correction="lm"``): a step is accepted when the actual reduction is at least
    ``ETA`` times the model's."""
    obj = run.obj
    graph = method in ("trust-ncg", "trust-exact", "newton")
    pt = run.first(x0, graph)
    run.record(pt)
    radius = options.get("initial_radius", 1.0)
    max_radius = options.get("max_radius", math.inf)
    mu, nu = None, 2.0
    B = None
    H, H_at = None, None
    path, path_at = None, None
    while True:
        if method in ("trust-exact", "newton") and H_at is not pt:
            H, H_at = obj.hessian(pt), pt
        if run.converged(pt):
            nxt = _stationary(run, pt, graph, H)
            if nxt is None:
                raise Stop("converged", "the gradient norm is below the tolerance")
            pt = nxt
            continue
        if method == "trust-ncg":
            if path_at is not pt:  # a rejected step re-cuts the same CG path, for free
                max_cg = options["cg_max_iter"] or 20 * obj.n
                path = SteihaugPath(
                    obj.operator(pt), pt.g, rtol=forcing_rtol(pt.g_norm(2)), max_iter=max_cg
                )
                path_at = pt
            sub = path.step(radius)
        elif method == "trust-exact":
            sub = exact_step(H, pt.g, radius)
        elif method == "sr1":
            if B is None:
                B = torch.eye(obj.n, dtype=obj.dtype, device=obj.device)
            sub = exact_step(B, pt.g, radius)
        else:  # Levenberg-Marquardt damping
            if mu is None:
                mu = 1e-3 * max(float(H.diagonal().abs().max()), 1e-12)
            step = damped_newton(H, pt.g, mu)
            if step is None:
                mu, nu = lm_damping(mu, nu, -1.0)
                continue
            p = step.direction
            pred = -float(torch.dot(pt.g, p) + 0.5 * torch.dot(p, H @ p))
            sub = None
        p = sub.step if sub is not None else p
        pred = sub.predicted if sub is not None else pred
        step_norm = float(torch.linalg.vector_norm(p))
        if step_norm == 0.0:
            raise Stop("no_progress", "the model's step is zero: no decrease is possible")
        if pred > 0:
            trial = run.evaluate(pt.x + p, graph or method == "sr1")
            rho = (pt.f - trial.f) / pred if trial.finite else -math.inf
        else:  # rounding swamped the model's decrease (badly scaled): try a smaller region
            trial, rho = None, -math.inf
        if method == "sr1" and trial is not None and trial.finite:
            s, y = p, trial.g - pt.g
            if run.nit == 0 and float(torch.dot(s, y)) > 0:  # scale B0 (N&W eq. 6.20)
                B = B * (float(torch.dot(y, y)) / float(torch.dot(s, y)))
            B = sr1_update(B, s, y)
        if sub is not None:
            radius = update_radius(radius, rho, step_norm, sub.on_boundary, max_radius)
        else:
            mu, nu = lm_damping(mu, nu, rho)
        if rho > (ETA if sub is not None else 0.0):
            old, pt = pt, trial
            run.after_step(old, pt, step_norm)
            continue
        run.nit += 1
        run.check_budget()
        x_norm = float(torch.linalg.vector_norm(pt.x))
        if sub is not None and radius <= run.tol.xtol * (1.0 + x_norm):
            raise Stop("no_progress", "the trust region shrank to nothing without a decrease")
        if sub is None and not math.isfinite(mu):
            raise Stop("no_progress", "the damping grew without bound without a decrease")


def nag_loop(run: Run, x0, options: dict):
    r"""Nesterov's accelerated gradient with a backtracking step (Beck & Teboulle 2009):
    from :math:`y_k = x_k + \beta_k (x_k - x_{k-1})` a gradient step whose length is cut
    until :math:`f(y - \alpha g) \le f(y) - \tfrac{\alpha}{2}\|g\|^2` (Armijo with
    :math:`c_1 = 1/2`); the momentum restarts whenever :math:`f` goes up (O'Donoghue &
    Candès 2015)."""
    pt = run.first(x0, False)
    run.record(pt)
    x_prev = pt.x
    t = 1.0
    alpha = initial_step(pt.g)
    while True:
        if run.converged(pt):
            nxt = _stationary(run, pt, False)
            if nxt is None:
                raise Stop("converged", "the gradient norm is below the tolerance")
            pt, x_prev, t = nxt, nxt.x, 1.0
            continue
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        base = pt
        if beta > 0:
            base = run.evaluate(pt.x + beta * (pt.x - x_prev))
            if not base.finite:
                base, t_next = pt, 1.0
        g = base.g
        gg = float(torch.dot(g, g))

        def phi(a: float, base=base, g=g):
            trial = run.evaluate(base.x - a * g)
            return trial.f, -float(torch.dot(trial.g, g)) if trial.finite else math.nan, trial

        ls = armijo(phi, base.f, -gg, alpha * 1.5, c1=0.5)
        if not ls.accepted:
            if base is not pt:  # drop the momentum and try a plain gradient step
                t, x_prev = 1.0, pt.x
                continue
            raise Stop("no_progress", f"the step search failed: {ls.message}")
        new = ls.payload
        alpha = ls.alpha
        if new.f > pt.f:  # momentum overshot: restart from pt with a plain gradient step
            t, x_prev = 1.0, pt.x
            continue
        x_prev, t = pt.x, t_next
        old, pt = pt, new
        run.after_step(old, pt, float(torch.linalg.vector_norm(pt.x - old.x)))
