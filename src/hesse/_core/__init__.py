"""Layer 1: parameter spaces and input checks."""

from hesse._core._checks import (
    NonFiniteError,
    all_finite,
    check_finite,
    check_operand,
    check_scalar,
)
from hesse._core._params import ParamSpace

__all__ = [
    "NonFiniteError",
    "all_finite",
    "ParamSpace",
    "check_finite",
    "check_operand",
    "check_scalar",
]
