"""What :func:`hesse.minimize` returns: scipy's ``OptimizeResult``, with torch tensors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from hesse._core._status import NotConvergedError, Status

#: How a run can end, and whether that counts as success: the minimisation endings of the
#: one vocabulary :class:`hesse.linalg.Status` (keys are its members, which equal and hash
#: like their strings: ``STATUSES["ftol"]`` works).
STATUSES: dict[Status, bool] = {
    Status.CONVERGED: True,  # the gradient test passed (and, for second-order methods, no
    # direction of negative curvature was found there)
    Status.FTOL: True,  # an iteration changed f by less than ftol: nothing more to gain (a
    # success only if the gradient is small-ish too, see Run.result)
    Status.XTOL: True,  # a step shorter than xtol (likewise)
    Status.MAX_ITERATIONS: False,
    Status.MAX_EVALUATIONS: False,
    Status.NO_PROGRESS: False,  # no acceptable step: a line search failed, a trust region
    # collapsed
    Status.NON_FINITE: False,
    Status.TIME_LIMIT: False,  # not an ending of minimize itself: a front end (the CLI's
    # ``compare --time-limit``) stops a run through the callback and reports it so
    Status.CALLBACK: False,
}

#: The names of minimize's settings in :meth:`Status.advice`'s templates.
ADVICE_NAMES = {
    "tol": "tol",
    "max_evals": 'options["max_fev"]',
    "fun": "fun",
    "x": "x",
    "gradient_check": "pass grad= or compare with finite differences",
}

#: What to change when a run ends with a status that is not a success: each status's one
#: template (:meth:`Status.advice`) in minimize's names, for ``max_iterations`` the
#: methods that need fewer iterations, and for ``non_finite`` where to start.
ADVICE: dict[Status, str] = {
    s: s.advice(**ADVICE_NAMES) for s in STATUSES if s is not Status.CONVERGED
}
ADVICE[Status.MAX_ITERATIONS] += (
    ", or use a method with second-order information (trust-ncg, newton-cg)"
)
ADVICE[Status.NON_FINITE] += (
    ", or start from a point where fun and its gradient are finite (or bound x so that fun "
    "stays finite)"
)


@dataclass
class OptimizeResult:
    """The outcome of :func:`hesse.minimize`, in the shape of
    :class:`scipy.optimize.OptimizeResult` (attribute or ``result["x"]`` access).

    Attributes:
        x: the solution, with the shape, dtype and device of ``x0`` (the best point seen
            when the run failed).
        fun: :math:`f(x)` (a 0-d tensor).
        jac: :math:`\\nabla f(x)`, shaped like ``x``.
        nit: iterations.
        nfev, njev: evaluations of ``f`` and of its gradient.
        nhev: dense Hessians formed (``newton``, ``trust-exact``).
        nhvp: Hessian-vector products.
        success: whether a convergence test passed; never with a non-finite ``fun``. A
            stop on ``ftol`` or ``xtol`` (nothing changes any more) counts only where the
            gradient norm is within ``sqrt(gtol)`` or 1e-3 of the start's.
        status: a :class:`hesse.linalg.Status` (a ``str``: it equals ``"converged"``,
            ...): ``"converged"``, ``"ftol"``, ``"xtol"`` (successes), or
            ``"max_iterations"``, ``"max_evaluations"``, ``"no_progress"``,
            ``"non_finite"``, ``"callback"``; ``"time_limit"`` where a front end stopped
            the run at its clock (``hesse compare --time-limit``; minimize itself never
            returns it). A string given here is turned into its member; one outside
            :data:`STATUSES` is a ``ValueError``.
        message: what happened, and what to change when it failed.
        method: the method's name.
        hess_inv: the inverse-Hessian approximation (``bfgs``, ``dfp``), flat ``(n, n)``.
        history: with ``options={"history": True}``, one dict per iteration (``nit``,
            ``fun``, ``grad_norm``, ``nfev``, ``njev``, ``nhvp``, ``nhev``, ``time``).
    """

    x: Tensor
    fun: Tensor
    jac: Tensor
    nit: int
    nfev: int
    njev: int
    nhev: int
    nhvp: int
    success: bool
    status: Status
    message: str
    method: str = ""
    hess_inv: Tensor | None = None
    history: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"status must be one of {[str(s) for s in STATUSES]}, got {self.status!r}"
            )
        self.status = Status(self.status)

    @property
    def advice(self) -> str:
        """What to change after this run (:data:`ADVICE`); ``""`` after a success."""
        return "" if self.success else ADVICE.get(self.status, "")

    def raise_for_status(self) -> OptimizeResult:
        """Return ``self`` if the run succeeded, else raise
        :class:`hesse.linalg.NotConvergedError` naming the method, the status, what
        happened and what to change (the ``throw=True`` of lineax, on request).

        Example:
            >>> import torch, hesse
            >>> f = lambda x: ((x - 1) ** 2).sum()
            >>> x0 = torch.zeros(3, dtype=torch.float64)
            >>> str(hesse.minimize(f, x0, "bfgs").raise_for_status().status)
            'converged'
        """
        if self.success:
            return self
        advice = self.advice
        raise NotConvergedError(
            f"minimize(method={self.method!r}) did not succeed: status '{self.status}' "
            f"after {self.nit} iterations and {self.nfev} evaluations: {self.message}"
            + (f". To fix: {advice}" if advice else "")
        )

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __repr__(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "history" and value is not None:
                value = f"[{len(value)} entries]"
            elif isinstance(value, Tensor) and value.numel() > 6:
                value = f"tensor of shape {tuple(value.shape)}, {value.dtype}"
            lines.append(f"{f.name:>9}: {value}")
        return "\n".join(lines)
