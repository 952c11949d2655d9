"""Applications: built-in problems.

* Machine-learning problems on data that ships with scikit-learn (:data:`PROBLEMS`,
  :func:`problem`): least squares and logistic regression, an MLP and a small CNN on the
  digits, each a :class:`Problem` (data, model factory, loss, penalty); and two tall
  synthetic logistic regressions (``logistic-tall``, ``logistic-correlated``,
  :func:`synthetic_logistic`) whose size :data:`SCALABLE` lets you choose.
* The classic unconstrained test functions of Moré, Garbow & Hillstrom (1981) and a few
  others, in torch, each with its standard starting point and minimum value
  (:data:`FUNCTIONS`, :func:`classic_function`).

Example:
    >>> from hesse.problems import classic_function
    >>> f = classic_function("beale")
    >>> x = f.x0()
    >>> float(f(x))
    14.203125
"""

from hesse.problems._datasets import (
    FEATURES,
    PROBLEMS,
    SCALABLE,
    Problem,
    load_into,
    problem,
    synthetic_logistic,
)
from hesse.problems._functions import FUNCTIONS, ClassicFunction, classic_function

__all__ = [
    # data problems
    "PROBLEMS",
    "SCALABLE",
    "Problem",
    "load_into",
    "problem",
    # synthetic data problems
    "FEATURES",
    "synthetic_logistic",
    # test functions
    "FUNCTIONS",
    "ClassicFunction",
    "classic_function",
]
