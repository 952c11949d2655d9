"""Layer 3: curvature as lazy linear operators of shape ``(P, P)``."""

from hesse.operators._base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from hesse.operators._model import (
    FiniteDifferenceHessian,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearizedCurvature,
    ModelCurvature,
)

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearizedCurvature",
    "ModelCurvature",
    "ScaledOperator",
    "SumOperator",
]
