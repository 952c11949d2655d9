"""The three loops every method runs in: a line search along a direction, a trust region
around a model, and Nesterov's accelerated gradient."""

from __future__ import annotations

import math

import torch

from hesse._core._status import Status
from hesse._minimize._directions import TRUST_MODELS, Direction, InverseUpdate, Newton
from hesse._minimize._run import Run, Stop
from hesse.solvers import armijo, initial_step, search_iteration
from hesse.solvers._iterate import f_rounding


def _stationary(run: Run, pt, graph: bool, H=None):
    """At a point that passes the gradient test: the point to go on from (after leaving a
    saddle), or ``None`` when it is a solution."""
    neg = run.negative_curvature(pt, H)
    if neg is None:
        return None
    return run.escape(pt, *neg, graph)


def line_search_loop(run: Run, direction: Direction, x0, options: dict):
    """Direction + line search (:func:`hesse.solvers.search_iteration`: after a failed
    search, once more along ``-g`` with the direction reset), until a test passes."""
    graph = direction.needs_graph
    pt = run.first(x0, graph)
    run.record(pt)

    def evaluate(x):
        return run.evaluate(x, graph)

    while True:
        if run.converged(pt):
            H = run.obj.hessian(pt) if isinstance(direction, Newton) and run.saddle_check else None
            nxt = _stationary(run, pt, graph, H)
            if nxt is None:
                raise Stop(Status.CONVERGED, "the gradient norm is below the tolerance")
            pt = nxt
            direction.reset()
            continue
        it = search_iteration(
            pt, direction, evaluate, options["line_search"], c1=options["c1"], c2=options["c2"]
        )
        if not it.accepted:
            raise Stop(Status.NO_PROGRESS, f"the line search failed: {it.search.message}")
        if isinstance(direction, InverseUpdate):
            run.hess_inv = direction.H
        old, pt = pt, it.point
        run.after_step(old, pt, it.step_norm)


def trust_region_loop(run: Run, method: str, x0, options: dict):
    """Model + region (trust-ncg, trust-exact, sr1, and newton with ``correction="lm"``,
    whose region is a damping): the subproblem built at the point gives the step for the
    region's size; a step is accepted when the ratio of actual to predicted reduction
    passes the size rule's threshold, and the rule updates the size from that ratio."""
    model = TRUST_MODELS[method](run.obj, options)
    region = model.size_rule()
    pt = run.first(x0, model.graph)
    run.record(pt)
    while True:
        H = model.hessian(pt)  # dense models: formed once per point, also for the saddle test
        if run.converged(pt):
            nxt = _stationary(run, pt, model.graph, H)
            if nxt is None:
                raise Stop(Status.CONVERGED, "the gradient norm is below the tolerance")
            pt = nxt
            continue
        sub = model.subproblem(pt)  # the same object after a rejected step (trust-ncg)
        step = sub.step(region.size(sub))
        if step is None:  # no step of this size (LM: B + mu I indefinite): a failed step
            region.update(-math.inf, 0.0, False)
            continue
        p = step.step
        step_norm = float(torch.linalg.vector_norm(p))
        if step_norm == 0.0:
            raise Stop(Status.NO_PROGRESS, "the model's step is zero: no decrease is possible")
        trial, rho = None, -math.inf
        if step.predicted > 0:  # else rounding swamped the model's decrease: shrink
            trial = run.evaluate(pt.x + p, model.trial_graph)
            if trial.finite:
                rho = (pt.f - trial.f) / step.predicted
                model.observe(pt, trial, p, run.nit == 0)
        region.update(rho, step_norm, step.on_boundary)
        if region.accepts(rho):
            old, pt = pt, trial
            run.after_step(old, pt, step_norm)
            continue
        run.nit += 1
        run.check_budget()
        why = region.exhausted(float(torch.linalg.vector_norm(pt.x)), run.tol.xtol)
        if why is not None:
            raise Stop(Status.NO_PROGRESS, why)


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
                raise Stop(Status.CONVERGED, "the gradient norm is below the tolerance")
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

        ls = armijo(phi, base.f, -gg, alpha * 1.5, c1=0.5, rounding=f_rounding(base))
        if not ls.accepted:
            if base is not pt:  # drop the momentum and try a plain gradient step
                t, x_prev = 1.0, pt.x
                continue
            raise Stop(Status.NO_PROGRESS, f"the step search failed: {ls.message}")
        new = ls.payload
        alpha = ls.alpha
        if new.f > pt.f:  # momentum overshot: restart from pt with a plain gradient step
            t, x_prev = 1.0, pt.x
            continue
        x_prev, t = pt.x, t_next
        old, pt = pt, new
        run.after_step(old, pt, float(torch.linalg.vector_norm(pt.x - old.x)))
