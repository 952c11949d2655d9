"""The solver peers: how ``minimize_profile.py``, ``minimize_logistic.py`` and
``logistic.py`` call the libraries that ``hesse.minimize`` is measured against.

Every solver is a function ``(fun, x0, ...) -> (x, info)`` of a torch function of one flat
float64 tensor, ``info`` holding what the solver reports (``nit``, ``nfev``, ...):
:func:`scipy_minimize` (through :class:`ScipyObjective`), :func:`torch_lbfgs`,
:func:`torchmin_minimize` (pytorch-minimize), :func:`sklearn_logistic` (scikit-learn's
``LogisticRegression``, on arrays) and :func:`hesse_minimize` for the same call of hesse.
A :class:`Watch` passed to the first two ends the run at the first point whose gradient
meets a target (it raises :class:`Reached`, which the runner catches); :func:`guarded_run`
times one run end to end under a time limit (:func:`time_limit`) and reports a failure
instead of raising. The curvature peers are in ``_peers.py``.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

import hesse

Fun = Callable[[Tensor], Tensor]


class RunTimeout(BaseException):
    """A run's wall-clock limit passed. A BaseException, so that no solver's ``except
    Exception`` swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`RunTimeout` in the main thread after ``seconds`` (between bytecodes: a
    long C call finishes first). Unix only (``SIGALRM``)."""

    def handler(signum: int, frame: Any) -> None:
        raise RunTimeout

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Reached(BaseException):
    """The objective met the target: the run ends here (a BaseException, so that no
    solver's ``except Exception`` swallows it)."""


class Watch:
    """Ends a run at the first evaluated point whose gradient's 2-norm is at most
    ``target``: ``check(x, g)`` counts the evaluation and raises :class:`Reached`, keeping
    ``x``; the runners that take a ``watch`` return that point."""

    def __init__(self, target: float):
        self.target, self.nfev, self.x = target, 0, None

    def check(self, x: Tensor, g: Tensor) -> None:
        self.nfev += 1
        if float(g.norm()) <= self.target:
            self.x = x.detach().clone()
            raise Reached


class ScipyObjective:
    """scipy's view of a torch function of a flat float64 vector: ``fg(x) -> (f, g)``
    through ``fun``, ``hessp`` and ``hess`` by autograd through ``raw`` (default ``fun``).

    With ``keep_graph`` the gradient's graph of the last ``fg`` call is kept, and a product
    at that same point reuses it (as hesse does); otherwise, and at another point, a product
    runs ``raw`` again (so a counter wrapped around ``fun`` does not see it).
    ``on_hvp``/``on_hess`` count products; ``watch`` sees every gradient."""

    def __init__(
        self,
        fun: Fun,
        raw: Fun | None = None,
        keep_graph: bool = False,
        on_hvp: Callable[[], None] | None = None,
        on_hess: Callable[[], None] | None = None,
        watch: Watch | None = None,
    ):
        self.fun, self.raw, self.keep_graph = fun, raw or fun, keep_graph
        self.on_hvp, self.on_hess, self.watch = on_hvp, on_hess, watch
        self._x: np.ndarray | None = None
        self._xl: Tensor | None = None
        self._g: Tensor | None = None

    def fg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        xl = torch.tensor(x, dtype=torch.float64).requires_grad_()
        f = self.fun(xl)
        (g,) = torch.autograd.grad(f, xl, create_graph=self.keep_graph)
        if self.watch is not None:
            self.watch.check(xl, g)
        if self.keep_graph:
            self._x, self._xl, self._g = np.array(x, copy=True), xl, g
        return float(f.detach()), g.detach().numpy().copy()

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        if self.on_hvp is not None:
            self.on_hvp()
        v = torch.from_numpy(np.asarray(p, dtype=np.float64))
        if self._x is not None and np.array_equal(x, self._x):
            (hv,) = torch.autograd.grad(self._g, self._xl, v, retain_graph=True)
            return hv.numpy().copy()
        xl = torch.tensor(x, dtype=torch.float64).requires_grad_()
        (g,) = torch.autograd.grad(self.raw(xl), xl, create_graph=True)
        (hv,) = torch.autograd.grad(g, xl, v)
        return hv.numpy().copy()

    def hess(self, x: np.ndarray) -> np.ndarray:
        if self.on_hess is not None:
            self.on_hess()
        H = torch.func.hessian(self.raw)(torch.tensor(x, dtype=torch.float64))
        return H.detach().numpy().copy()


def scipy_minimize(
    obj: ScipyObjective,
    x0: Tensor,
    method: str,
    options: dict,
    hessp: bool = False,
    hess: bool = False,
) -> tuple[Tensor, dict]:
    """``scipy.optimize.minimize(obj.fg, x0, method, jac=True, options=...)``, with
    ``obj.hessp`` or ``obj.hess`` where asked. ``info``: ``status``, ``message``,
    ``success``, ``nit``, ``nfev``, ``fun`` as scipy reports them; after a :class:`Reached`,
    the watched point and ``{"nfev": watch.nfev}``."""
    import scipy.optimize

    kw = {"hessp": obj.hessp} if hessp else {"hess": obj.hess} if hess else {}
    try:
        r = scipy.optimize.minimize(
            obj.fg, x0.numpy().copy(), method=method, jac=True, options=options, **kw
        )
    except Reached:
        return obj.watch.x, {"nfev": obj.watch.nfev}
    return torch.from_numpy(r.x), {
        "status": int(r.status),
        "message": str(r.message),
        "success": bool(r.success),
        "nit": int(getattr(r, "nit", -1)),
        "nfev": int(r.nfev),
        "fun": float(r.fun),
    }


def torch_lbfgs(
    fun: Fun,
    x0: Tensor,
    history_size: int,
    tolerance_grad: float,
    max_iter: int,
    max_eval: int,
    watch: Watch | None = None,
) -> tuple[Tensor, dict]:
    """One ``step`` of ``torch.optim.LBFGS(lr=1, line_search_fn="strong_wolfe",
    tolerance_change=0, ...)`` from ``x0``. ``info``: ``nit`` and ``nfev`` from the
    optimizer's state (``nfev`` the watch's count where one is given)."""
    x = x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=max_iter,
        max_eval=max_eval,
        tolerance_grad=tolerance_grad,
        tolerance_change=0,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        f = fun(x)
        f.backward()
        if watch is not None:
            watch.check(x, x.grad)
        return f

    try:
        opt.step(closure)
        out = x.detach()
    except Reached:
        out = watch.x
    st = opt.state[x]
    nfev = watch.nfev if watch is not None else st.get("func_evals")
    return out, {"nit": st.get("n_iter"), "nfev": nfev}


def torchmin_minimize(fun: Fun, x0: Tensor, method: str, options: dict) -> tuple[Tensor, dict]:
    """``torchmin.minimize(fun, x0, method, options=...)`` (pytorch-minimize). ``info``:
    ``status``, ``message``, ``success``, ``nit``, ``nfev``, ``fun`` (-1 or empty where its
    result lacks one)."""
    import torchmin

    r = torchmin.minimize(fun, x0.clone(), method=method, options=options)
    return r.x.detach(), {
        "status": int(getattr(r, "status", -1)),
        "message": str(getattr(r, "message", "")),
        "success": bool(getattr(r, "success", False)),
        "nit": int(getattr(r, "nit", -1)),
        "nfev": int(getattr(r, "nfev", -1)),
        "fun": float(r.fun),
    }


def sklearn_logistic(
    X: np.ndarray,
    y: np.ndarray,
    solver: str,
    C: float,
    tol: float,
    fit_intercept: bool,
    max_iter: int,
) -> tuple[Tensor, dict]:
    """scikit-learn's ``LogisticRegression`` (binary) fitted on ``X, y``: ``x`` is the
    weights, followed by the intercept with ``fit_intercept``; ``info``: ``nit``."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(
        C=C, solver=solver, tol=tol, fit_intercept=fit_intercept, max_iter=max_iter
    )
    m.fit(X, y)
    coef = m.coef_.ravel()
    x = np.concatenate([coef, m.intercept_]) if fit_intercept else coef.copy()
    return torch.from_numpy(x), {"nit": int(m.n_iter_[0])}


def hesse_minimize(
    fun: Fun, x0: Tensor, method: str, grad_rtol: float, **options: Any
) -> tuple[Tensor, dict]:
    """``hesse.minimize`` stopping at ``||g||_2 <= grad_rtol ||g(x0)||_2`` and on nothing
    else, with the method's ``options``. ``info``: ``nit``, ``nfev``, ``nhvp``, ``status``."""
    stop = {"gtol": 0.0, "grad_rtol": grad_rtol, "norm": 2}
    r = hesse.minimize(fun, x0, method, options={**stop, **options})
    return r.x, {"nit": r.nit, "nfev": r.nfev, "nhvp": r.nhvp, "status": r.status}


def guarded_run(
    call: Callable[[], tuple[Tensor, dict]], limit: float
) -> tuple[Tensor | None, dict]:
    """``call()`` timed end to end (warnings silenced), stopped after ``limit`` seconds.
    Returns ``(x, {"seconds": s, **info})``, or ``(None, {"ok": False, "error": why,
    "seconds": None})`` for a run that timed out or raised: a failed solver is reported,
    not fatal. The caller checks ``x`` afterwards, outside the time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning and the like
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                x, info = call()
        except RunTimeout:
            return None, {"ok": False, "error": f"over the {limit:g} s limit", "seconds": None}
        except Exception as e:
            return None, {"ok": False, "error": f"{type(e).__name__}: {e}"[:300], "seconds": None}
        secs = time.perf_counter() - t0
    return x, {"seconds": secs, **info}
