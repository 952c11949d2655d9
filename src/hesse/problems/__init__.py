"""Applications: classic unconstrained test problems with known minima.

The functions of Moré, Garbow & Hillstrom (1981) and a few others, in torch, each with its
standard starting point and minimum value; see :data:`FUNCTIONS` for the list.

Example:
    >>> from hesse.problems import classic_function
    >>> f = classic_function("beale")
    >>> x = f.x0()
    >>> float(f(x))
    14.203125
"""

from hesse.problems._functions import FUNCTIONS, ClassicFunction, classic_function

__all__ = ["FUNCTIONS", "ClassicFunction", "classic_function"]
