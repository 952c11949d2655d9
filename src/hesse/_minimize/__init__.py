"""``hesse.minimize``: deterministic minimisation of a function of one tensor (layer 7),
driving the mathematics of :mod:`hesse.solvers`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hesse._core._checks import check_int, check_real
from hesse._minimize._directions import LBFGS, Gradient, Newton, NewtonCG, bfgs, dfp
from hesse._minimize._finite_sum import (
    SUBSAMPLED_OPTIONS,
    FiniteSum,
    check_subsampled_options,
    subsampled_newton_loop,
)
from hesse._minimize._loops import line_search_loop, nag_loop, trust_region_loop
from hesse._minimize._objective import Objective
from hesse._minimize._result import STATUSES, OptimizeResult
from hesse._minimize._run import Run, Stop
from hesse.func._tensor import _check_point
from hesse.solvers import CORRECTIONS, LINE_SEARCHES, Tolerances, default_tolerances

#: Line-search methods and their directions.
_LINE_SEARCH = {
    "newton": Newton,
    "newton-cg": NewtonCG,
    "bfgs": bfgs,
    "dfp": dfp,
    "l-bfgs": LBFGS,
    "gd": Gradient,
}
_TRUST = ("trust-ncg", "trust-exact", "sr1")
METHODS = (
    "newton",
    "newton-cg",
    "trust-ncg",
    "trust-exact",
    "bfgs",
    "dfp",
    "sr1",
    "l-bfgs",
    "gd",
    "nag",
)
#: Methods that need ``fun`` to be a :class:`FiniteSum` (they see its samples); they use
#: second derivatives and check for saddles by default too.
FINITE_SUM_METHODS = ("subsampled-newton",)
#: Methods that use second derivatives, and so check for saddles by default.
SECOND_ORDER = ("newton", "newton-cg", "trust-ncg", "trust-exact")
_NAMES = (*METHODS, *FINITE_SUM_METHODS)

_COMMON = {
    "gtol": None,
    "grad_rtol": 0.0,
    "ftol": None,
    "xtol": None,
    "norm": math.inf,
    "max_fev": None,
    "history": False,
    "saddle_check": None,
    "curvature_tol": None,
}
_LS = {"line_search": "strong-wolfe", "c1": 1e-4, "c2": 0.9}
_TR = {"initial_radius": 1.0, "max_radius": 1e4}
_OPTIONS: dict[str, dict[str, Any]] = {
    "newton": {**_LS, "correction": "eigen-flip"},
    "newton-cg": {**_LS, "cg_max_iter": None},
    "trust-ncg": {**_TR, "cg_max_iter": None},
    "trust-exact": dict(_TR),
    "sr1": dict(_TR),
    "bfgs": dict(_LS),
    "dfp": dict(_LS),
    "l-bfgs": {**_LS, "memory": 10},
    "gd": dict(_LS),
    "nag": {},
    "subsampled-newton": dict(SUBSAMPLED_OPTIONS),
}
_ALL_OPTIONS = set(_COMMON).union(*(set(o) for o in _OPTIONS.values()))


class OptimizeWarning(UserWarning):
    """An option that does not apply to the chosen method was given (and is ignored)."""


def _method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a string, one of {', '.join(_NAMES)}; got {type(method).__name__}"
        )
    name = method.strip().lower().replace("_", "-")
    aliases = {
        "lbfgs": "l-bfgs",
        "newtoncg": "newton-cg",
        "ncg": "newton-cg",
        "ssn": "subsampled-newton",
    }
    name = aliases.get(name, name)
    if name not in _NAMES:
        raise ValueError(f"unknown method {method!r}; hesse.minimize has: {', '.join(_NAMES)}")
    return name


def _default_method(fun, x0: Tensor, grad, hvp, options) -> str:
    """``method=None``: subsampled Newton for a FiniteSum it can take (differentiated by
    autograd, a Hessian of at most ``dense_max`` unknowns), else trust-ncg."""
    given = options if isinstance(options, dict) else {}
    dense_max = given.get("dense_max", SUBSAMPLED_OPTIONS["dense_max"])
    if isinstance(fun, FiniteSum) and grad is None and hvp is None:
        if isinstance(dense_max, int) and x0.numel() <= dense_max:
            return "subsampled-newton"
    return "trust-ncg"


def _options(method: str, options: dict | None) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    known = {**_COMMON, **_OPTIONS[method]}
    out = dict(known)
    for key, value in options.items():
        if key not in _ALL_OPTIONS:
            raise ValueError(
                f"unknown option {key!r} for method {method!r}; its options are: "
                f"{', '.join(sorted(known))}"
            )
        if key not in known:
            warnings.warn(
                f"option {key!r} does not apply to method {method!r} and is ignored",
                OptimizeWarning,
                stacklevel=3,
            )
            continue
        out[key] = value
    if "line_search" in known and out["line_search"] not in LINE_SEARCHES:
        raise ValueError(f"line_search must be one of {LINE_SEARCHES}, got {out['line_search']!r}")
    if "correction" in known and out["correction"] not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {out['correction']!r}")
    if "c1" in known:
        c1, c2 = (_number(k, out[k], positive=True) for k in ("c1", "c2"))
        if not c1 < c2 < 1:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1!r}, c2={c2!r}")
    if "initial_radius" in known:
        r0, r_max = (_number(k, out[k], positive=True) for k in ("initial_radius", "max_radius"))
        if r0 > r_max:
            raise ValueError(
                f"initial_radius must not exceed max_radius, got initial_radius={r0!r} > "
                f"max_radius={r_max!r}"
            )
    if "memory" in known:  # no default to fall back on: None is refused like 0
        out["memory"] = _positive_int("memory", out["memory"])
    for key in ("cg_max_iter", "max_fev"):  # None: the default
        if out.get(key) is not None:
            out[key] = _positive_int(key, out[key])
    for key in ("history", "saddle_check"):
        v = out[key]
        if not (isinstance(v, bool) or (v is None and key == "saddle_check")):
            allowed = "True, False or None" if key == "saddle_check" else "True or False"
            raise ValueError(f"{key} must be {allowed}, got {v!r}")
    if out["curvature_tol"] is not None:
        out["curvature_tol"] = _number("curvature_tol", out["curvature_tol"])
    if out["norm"] not in (2, math.inf):
        raise ValueError(f"norm must be 2 or math.inf, got {out['norm']!r}")
    return out


def _number(key: str, v: object, positive: bool = False) -> float:
    """``v`` as a float if it is a finite real number ``>= 0`` (``> 0`` if ``positive``);
    else a ``ValueError`` naming the option (:func:`hesse._core._checks.check_real`).
    ``nan`` and ``inf`` are refused: compared with a threshold, ``nan`` silently turns a
    test off and ``inf`` makes it vacuous."""
    return check_real(v, key, 0.0, open_lo=positive)


def _positive_int(key: str, v: object) -> int:
    """``v`` as an int ``>= 1`` (never a bool or a float), else a ``ValueError`` naming the
    option (:func:`hesse._core._checks.check_int`)."""
    return check_int(v, key, 1)


def _tolerances(dtype: torch.dtype, tol: float | None, opts: dict) -> Tolerances:
    d = default_tolerances(dtype)
    gtol = opts["gtol"] if opts["gtol"] is not None else tol if tol is not None else d.gtol
    values = {
        "gtol": gtol,
        "grad_rtol": opts["grad_rtol"],
        "ftol": d.ftol if opts["ftol"] is None else opts["ftol"],
        "xtol": d.xtol if opts["xtol"] is None else opts["xtol"],
    }
    values = {key: _number(key, v) for key, v in values.items()}
    return Tolerances(norm=opts["norm"], **values)


def minimize(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor,
    method: str | None = None,
    *,
    grad: Callable[[Tensor], Tensor] | None = None,
    hvp: Callable[[Tensor, Tensor], Tensor] | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    callback: Callable[[OptimizeResult], bool | None] | None = None,
    options: dict[str, Any] | None = None,
) -> OptimizeResult:
    r"""Minimise ``fun(x)`` over a tensor ``x`` from ``x0``.

    Methods (all share the line searches, quasi-Newton updates and trust-region solvers
    of :mod:`hesse.solvers`):

    ==================  =====================================================================
    ``"newton"``        dense Hessian, strong-Wolfe line search; an indefinite or singular
                        Hessian is corrected by ``options["correction"]``: ``"eigen-flip"``
                        (default), ``"eigen-clip"``, ``"cholesky"`` (modified Cholesky) or
                        ``"lm"`` (Levenberg-Marquardt damping adapted by the reduction ratio)
    ``"newton-cg"``     truncated CG on Hessian-vector products (Hessian-free), line search,
                        negative curvature handled
    ``"trust-ncg"``     Steihaug-Toint CG in a trust region (the default for a function)
    ``"trust-exact"``   the exact trust-region subproblem on the dense Hessian (Moré-Sorensen)
    ``"bfgs"``/``"dfp"`` rank-2 updates of a dense inverse Hessian, Powell-damped
    ``"sr1"``           rank-1 updates of the Hessian, in a trust region
    ``"l-bfgs"``        the two-loop recursion over the last ``memory`` pairs (default 10)
    ``"gd"``            gradient descent with the same line search
    ``"nag"``           Nesterov's accelerated gradient, backtracking step, adaptive restart
    ``"subsampled-newton"`` for a :class:`FiniteSum` (data plus a per-batch loss): the full
                        gradient, the dense Hessian of a growing subsample, a damped
                        Cholesky solve, a backtracking search on the full objective (the
                        mathematics of :class:`hesse.optim.SubsampledNewton`), after a
                        warm start on nested samples of growing size (tall data)
    ==================  =====================================================================

    ``fun`` may be a :class:`FiniteSum` for any method (it is a callable whose value is
    the full objective); ``"subsampled-newton"`` needs one.

    Stops when :math:`\|\nabla f\|_\infty \le` ``tol`` (default :math:`\epsilon^{1/3}`
    of the dtype: 6e-6 in float64, 5e-3 in float32), when an iteration changes ``f`` or
    ``x`` by less than rounding (``ftol``, ``xtol``), or on a budget. The second-order
    methods then check the curvature (the dense Hessian's eigenvalues, or Lanczos on
    Hessian-vector products): at a saddle they step along the direction of negative
    curvature and go on (``options={"saddle_check": ...}`` switches this on or off for any
    method). A trial point where ``fun`` is not finite shortens the step; the run never
    reports success with a non-finite ``fun`` and returns the best point it saw.

    Args:
        fun: ``x -> scalar tensor``, differentiable by autograd unless ``grad`` is given
            (a value with no autograd path back to ``x`` at ``x0``, e.g. from ``x.detach()``
            or numpy, raises a ``ValueError`` rather than reading as a zero gradient).
        x0: the start (any shape; floating point; never modified).
        method: one of the names above (case and ``_``/``-`` do not matter). ``None``
            (default): ``"subsampled-newton"`` for a :class:`FiniteSum` without ``grad``
            or ``hvp`` and with at most ``dense_max`` unknowns (4096 unless
            ``options`` says otherwise; tall data: ``benchmarks/logistic.py``), else
            ``"trust-ncg"``.
        grad: ``x -> gradient`` instead of autograd.
        hvp: ``(x, v) -> Hessian @ v`` instead of autograd (with ``grad`` but no ``hvp``,
            products are central differences of ``grad``).
        tol: the gradient tolerance ``gtol``.
        max_iter: most iterations (default ``max(1000, 200 n)``).
        callback: called after each iteration with an intermediate
            :class:`OptimizeResult`; returning ``True`` or raising ``StopIteration`` stops.
        options: ``gtol``, ``grad_rtol`` (relative to the start's gradient), ``ftol``,
            ``xtol`` (finite numbers ``>= 0``; 0 stops only on an exact zero), ``norm``
            (``math.inf`` or ``2``), ``max_fev``, ``history``, ``saddle_check``,
            ``curvature_tol`` (a finite number ``>= 0``, default :math:`\epsilon^{1/3}`: a
            stationary point with curvature below ``-curvature_tol`` is a saddle; 0 counts
            any negative curvature, so rounding at a minimum with a singular Hessian may then
            end the run as a saddle it cannot leave); line-search methods: ``line_search``
            (``"strong-wolfe"``, ``"wolfe"`` (weak) or ``"armijo"``), ``c1``, ``c2``; trust regions:
            ``initial_radius`` :math:`\le` ``max_radius`` (finite, positive); ``correction``
            (newton), ``cg_max_iter`` (newton-cg, trust-ncg), ``memory`` (l-bfgs). An option
            ``subsampled-newton``: ``subsample`` (samples, or a fraction of them, for the
            first curvature; default 0.1; a fraction gives at least 4 samples per
            unknown), ``subsample_growth`` (:math:`\gamma` of
            :func:`hesse.solvers.subsample_size`, default 0.5), ``subsample_max`` (a cap,
            samples or fraction), ``gradient_sample`` (the first of the warm start's
            phases on nested samples growing tenfold, each minimised until its gradient
            is within its sampling noise, while the sample is at most half the data:
            samples, a fraction, ``"auto"``, 10 per unknown, the default, or ``None`` for
            the full gradient from the start), ``precision`` (``"full"``, the default, or
            ``"mixed"``: from a float64 ``x0``, the whole method first on a float32 copy of
            the data's float64 tensors, to the same tolerances, then float64 from its
            point; its float32 evaluations count in ``nfev``), ``damping`` (the initial
            :math:`\mu`, default 1e-3),
            ``dense_max`` (the most unknowns it forms a Hessian for, default 4096),
            ``seed``. An option
            of another method warns (:class:`OptimizeWarning`); an unknown one raises, and so
            does a value out of range (``nan`` or ``inf`` included).

    Returns:
        :class:`OptimizeResult` (``x``, ``fun``, ``jac``, ``nit``, ``nfev``, ``njev``,
        ``nhev``, ``nhvp``, ``success``, ``status``, ``message``, ...).

    Example:
        >>> rosen = lambda x: 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        >>> r = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), "trust-ncg")
        >>> r.success, r.x.round(decimals=6)
        (True, tensor([1., 1.], dtype=torch.float64))
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable (x -> scalar tensor), got {type(fun).__name__}")
    x0 = _check_point(x0, "x0")
    if x0.numel() == 0:
        raise ValueError(
            f"x0 must hold at least one unknown, got an empty tensor of shape {tuple(x0.shape)}"
        )
    name = _method(_default_method(fun, x0, grad, hvp, options) if method is None else method)
    opts = _options(name, options)
    if name in FINITE_SUM_METHODS:
        if not isinstance(fun, FiniteSum):
            raise TypeError(
                f"method {name!r} subsamples the data, so fun must be a hesse.FiniteSum(loss, "
                f"data) (a per-batch loss and its samples), got {type(fun).__name__}; for a "
                "function of one tensor use 'newton', 'newton-cg' or 'trust-ncg'"
            )
        if grad is not None or hvp is not None:
            raise ValueError(
                f"method {name!r} differentiates the FiniteSum's loss by autograd; drop grad= "
                "and hvp="
            )
        check_subsampled_options(opts, x0.numel())
    for what, f in (("grad", grad), ("hvp", hvp), ("callback", callback)):
        if f is not None and not callable(f):
            raise TypeError(f"{what} must be callable or None, got {type(f).__name__}")
    n = x0.numel()
    max_iter = max(1000, 200 * n) if max_iter is None else _positive_int("max_iter", max_iter)
    if tol is not None:
        tol = _number("tol", tol, positive=True)
    tols = _tolerances(x0.dtype, tol, opts)
    saddle = (
        opts["saddle_check"]
        if opts["saddle_check"] is not None
        else name in (*SECOND_ORDER, *FINITE_SUM_METHODS)
    )
    curv_tol = opts["curvature_tol"]  # 0 is a real choice, so test for None, not falsiness
    if curv_tol is None:
        curv_tol = torch.finfo(x0.dtype).eps ** (1.0 / 3.0)
    obj = Objective(fun, x0, grad, hvp)
    run = Run(
        name,
        obj,
        tols,
        max_iter,
        opts["max_fev"] or 2**62,
        callback,
        opts["history"],
        saddle,
        curv_tol,
    )
    x = x0.detach().clone().reshape(-1)  # the caller's x0 is never written to
    try:
        if name == "nag":
            nag_loop(run, x, opts)
        elif name == "subsampled-newton":
            subsampled_newton_loop(run, fun, x, opts)
        elif name in _TRUST or (name == "newton" and opts["correction"] == "lm"):
            trust_region_loop(run, name, x, opts)
        else:
            line_search_loop(run, _LINE_SEARCH[name](obj, opts), x, opts)
    except Stop as stop:
        end = stop
    if run.current is None:
        return _no_point(run, x, end)
    return run.result(run.current, end.status, end.message)


def _no_point(run: Run, x: Tensor, end: Stop) -> OptimizeResult:
    c = run.obj.counts
    nan = torch.full_like(x, math.nan)
    return OptimizeResult(
        x=x.view(run.obj.shape),
        fun=torch.tensor(math.nan, dtype=x.dtype, device=x.device),
        jac=nan.view(run.obj.shape),
        nit=run.nit,  # 0, or the iterations of subsampled Newton's phases on samples
        nfev=c.nfev,
        njev=c.njev,
        nhev=c.nhev,
        nhvp=c.nhvp,
        success=False,
        status=end.status,
        message=end.message,
        method=run.method,
    )


__all__ = [
    "FINITE_SUM_METHODS",
    "METHODS",
    "FiniteSum",
    "OptimizeResult",
    "OptimizeWarning",
    "STATUSES",
    "minimize",
]
