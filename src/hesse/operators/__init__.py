"""Layer 3: curvature as lazy linear operators of shape ``(P, P)``."""

from hesse.operators._base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from hesse.operators._ekfac import EKFACOperator
from hesse.operators._finite import FiniteDifferenceHessian
from hesse.operators._function import FunctionHessian, PointHessian
from hesse.operators._kfac import KFACOperator, KroneckerBlock
from hesse.operators._model import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearizedCurvature,
    ModelCurvature,
)
from hesse.operators._structured import DiagonalOperator, LowRankOperator

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "EKFACOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "FunctionHessian",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "KroneckerBlock",
    "LinearizedCurvature",
    "LowRankOperator",
    "ModelCurvature",
    "PointHessian",
    "ScaledOperator",
    "SumOperator",
]
