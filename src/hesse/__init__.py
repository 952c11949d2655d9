"""hesse: the Hessian in machine learning, with PyTorch.

Compute it (exact Hessian-, Gauss-Newton- and Fisher-vector products, dense Hessians,
finite differences), as lazy operators over a model's loss and data.
"""

from hesse import func, operators
from hesse._core import NonFiniteError, ParamSpace
from hesse.func import fd_hvp, fisher_vp, ggn_vp, hessian, hvp, linearize_hvp
from hesse.operators import (
    CurvatureOperator,
    DenseOperator,
    FiniteDifferenceHessian,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    LinearizedCurvature,
)

__version__ = "0.1.0"

__all__ = [
    # derivatives of a function of one tensor
    "fd_hvp",
    "fisher_vp",
    "ggn_vp",
    "hessian",
    "hvp",
    "linearize_hvp",
    # curvature operators
    "CurvatureOperator",
    "DenseOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearizedCurvature",
    # core
    "NonFiniteError",
    "ParamSpace",
    # modules
    "func",
    "operators",
]
