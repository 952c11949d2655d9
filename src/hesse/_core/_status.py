"""One vocabulary for how a routine ends, shared by :mod:`hesse.linalg`,
:mod:`hesse.solvers` and :func:`hesse.minimize`, with what to change after each ending.

:class:`Status` is a ``str``: ``result.status == "converged"`` and
``result.status in {"converged"}`` hold for ``Status.CONVERGED``, so code written against
the strings of earlier versions keeps working. Which endings count as a success is the
result's business (an estimator's ``"budget"`` is one, a solver's ``"max_iterations"`` is
not), not the vocabulary's.
"""

from __future__ import annotations

from enum import Enum


class NotConvergedError(RuntimeError):
    """Raised by ``result.raise_for_status()`` when a routine did not succeed."""


class Status(str, Enum):
    """How an iterative routine ended. A string, so ``result.status == "converged"`` works.

    The first eight are the endings of :mod:`hesse.linalg`'s routines (and of the solvers
    built on them); the next five are the further endings of a minimisation
    (:class:`hesse.OptimizeResult`) and of a line search
    (:attr:`hesse.solvers.LineSearchResult.outcome`); the last, ``TIME_LIMIT``, is the
    ending of a run that a front end stopped at its clock (``hesse compare
    --time-limit``). :meth:`advice` says what to change after each.

    Example:
        >>> Status.MAX_ITERATIONS == "max_iterations"
        True
        >>> Status("max_evaluations").advice(max_evals='options["max_fev"]')
        'raise options["max_fev"]'
    """

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NEGATIVE_CURVATURE = "negative_curvature"
    BOUNDARY = "boundary"
    BREAKDOWN = "breakdown"
    NON_FINITE = "non_finite"
    BUDGET = "budget"  # a fixed budget of products was spent (estimators: not a failure)
    PRECISION = "precision"  # the answer is below what the products' accuracy resolves
    # -- minimisation and line searches ------------------------------------------------
    FTOL = "ftol"  # f changed by less than ftol in an iteration
    XTOL = "xtol"  # a step was shorter than xtol
    MAX_EVALUATIONS = "max_evaluations"  # a budget of function evaluations was spent
    NO_PROGRESS = "no_progress"  # no acceptable step (a search failed, a region collapsed)
    CALLBACK = "callback"  # the user's callback asked to stop
    # -- front ends ----------------------------------------------------------------------
    TIME_LIMIT = "time_limit"  # the front end's time limit stopped the run

    def __str__(self) -> str:
        return self.value

    # Enum hashes a member by its name; a str-valued member must hash like the string it
    # equals, or ``Status.FTOL in {"ftol"}`` and ``{"ftol": ...}[Status.FTOL]`` fail.
    __hash__ = str.__hash__

    @property
    def template(self) -> str:
        """What to change after this ending, with ``{placeholders}`` for the names of the
        settings (:data:`ADVICE_NAMES` gives their defaults); ``""`` where nothing needs
        to change."""
        return ADVICE_TEMPLATES[self]

    def advice(self, **names: str) -> str:
        """:attr:`template` with the names of the caller's settings filled in (a front end
        passes its own: ``tol="gtol"``, ``max_evals='options["max_fev"]'``); the
        defaults are :data:`ADVICE_NAMES`. Unknown names are a ``TypeError``."""
        unknown = set(names) - set(ADVICE_NAMES)
        if unknown:
            raise TypeError(
                f"Status.advice takes the names {sorted(ADVICE_NAMES)}, got {sorted(unknown)}"
            )
        return self.template.format_map({**ADVICE_NAMES, **names})


#: The default names that :meth:`Status.advice` puts in the templates.
ADVICE_NAMES = {
    "max_iter": "max_iter",
    "tol": "tol",
    "max_evals": "max_evals",
    "fun": "the function",
    "x": "the variables",
    "gradient_check": "compare it with finite differences",
    "indefinite": "minres",
    "products": "the products",
    "time_limit": "the time limit",
}

#: What to change after each ending (see :meth:`Status.advice`); one sentence each, with
#: ``{placeholders}`` for the names a front end gives its settings.
ADVICE_TEMPLATES: dict[Status, str] = {
    Status.CONVERGED: "",
    Status.MAX_ITERATIONS: "raise {max_iter} or loosen {tol}",
    Status.NEGATIVE_CURVATURE: "the operator is not positive definite: damp it, or use a "
    "method for indefinite problems ({indefinite})",
    Status.BOUNDARY: "",  # the trust region's radius bounded the step: its caller's business
    Status.BREAKDOWN: "pass a positive definite preconditioner, or none",
    Status.NON_FINITE: "check {fun}, the data and the dtype",
    Status.BUDGET: "",  # the estimate of a fixed budget: raise it for a smaller error
    Status.PRECISION: "compute {products} in a wider dtype",
    Status.FTOL: "the value of {fun} stopped changing with the gradient still large: rescale "
    "{x} so that the entries are of similar size, or try another method",
    Status.XTOL: "the steps became negligible with the gradient still large: rescale {x} so "
    "that the entries are of similar size, or try another method",
    Status.MAX_EVALUATIONS: "raise {max_evals}",
    Status.NO_PROGRESS: "check that {fun} is smooth and its gradient correct "
    "({gradient_check}), rescale {x}, or try another method",
    Status.CALLBACK: "the callback asked to stop; the best point so far is returned",
    Status.TIME_LIMIT: "raise {time_limit}",
}
