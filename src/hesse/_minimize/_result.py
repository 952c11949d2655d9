"""What :func:`hesse.minimize` returns: scipy's ``OptimizeResult``, with torch tensors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from hesse.linalg import NotConvergedError

#: How a run can end, and whether that counts as success.
STATUSES = {
    "converged": True,  # the gradient test passed (and, for second-order methods, no
    # direction of negative curvature was found there)
    "ftol": True,  # an iteration changed f by less than ftol: nothing more to gain (a
    # success only if the gradient is small-ish too, see Run.result)
    "xtol": True,  # a step shorter than xtol (likewise)
    "max_iterations": False,
    "max_evaluations": False,
    "no_progress": False,  # no acceptable step: a line search failed, a trust region collapsed
    "non_finite": False,
    "callback": False,
}

#: What to change when a run ends with a status that is not a success.
ADVICE = {
    "ftol": "f stopped changing with the gradient still large: rescale x so that its "
    "entries are of similar size, or try another method",
    "xtol": "the steps became negligible with the gradient still large: rescale x so that "
    "its entries are of similar size, or try another method",
    "max_iterations": "raise max_iter, or use a method with second-order information "
    "(trust-ncg, newton-cg)",
    "max_evaluations": 'raise options["max_fev"]',
    "no_progress": "check that fun is smooth and its gradient correct (pass grad= or "
    "compare with finite differences), rescale x, or try another method",
    "non_finite": "start from a point where fun and its gradient are finite, or bound the "
    "variables so that fun stays finite",
    "callback": "the callback asked to stop; the best point so far is returned",
}


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
        status: ``"converged"``, ``"ftol"``, ``"xtol"`` (successes), or
            ``"max_iterations"``, ``"max_evaluations"``, ``"no_progress"``,
            ``"non_finite"``, ``"callback"``.
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
    status: str
    message: str
    method: str = ""
    hess_inv: Tensor | None = None
    history: list[dict[str, Any]] | None = field(default=None, repr=False)

    def raise_for_status(self) -> OptimizeResult:
        """Return ``self`` if the run succeeded, else raise
        :class:`hesse.linalg.NotConvergedError` naming the method, the status, what
        happened and what to change (the ``throw=True`` of lineax, on request).

        Example:
            >>> import torch, hesse
            >>> f = lambda x: ((x - 1) ** 2).sum()
            >>> x0 = torch.zeros(3, dtype=torch.float64)
            >>> hesse.minimize(f, x0, "bfgs").raise_for_status().status
            'converged'
        """
        if self.success:
            return self
        advice = ADVICE.get(self.status, "")
        raise NotConvergedError(
            f"minimize(method={self.method!r}) did not succeed: status {self.status!r} "
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
