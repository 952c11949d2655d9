"""hesse: the Hessian in machine learning, with PyTorch.

Compute it (exact Hessian-, Gauss-Newton- and Fisher-vector products, dense Hessians,
finite differences), as lazy operators over a model's loss and data; approximate it
(low-rank, diagonal); analyse it (eigenvalues, trace, spectral density, condition number,
convexity); use it (``minimize``: Newton, Newton-CG, trust regions, BFGS, DFP, SR1,
L-BFGS).
"""

from hesse import analysis, distributed, func, linalg, operators, optim, solvers
from hesse._core import NonFiniteError, ParamSpace
from hesse._core._progress import progress
from hesse._minimize import FiniteSum, OptimizeResult, OptimizeWarning, minimize
from hesse.analysis import (
    ConvexityReport,
    Verdict,
    condition_number,
    convexity,
    diagonal,
    eigenvalues,
    layer_report,
    spectral_density,
    trace,
)
from hesse.compress import PruneReport, prune
from hesse.func import (
    FiniteDifferenceWarning,
    ModelIO,
    fd_hvp,
    fisher_vp,
    ggn_vp,
    hessian,
    hvp,
    linearize_hvp,
    second_order,
)
from hesse.linalg import InverseOperator, Status, low_rank
from hesse.operators import (
    CurvatureOperator,
    DenseOperator,
    DiagonalOperator,
    EKFACOperator,
    FiniteDifferenceHessian,
    FisherOperator,
    FunctionHessian,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    KFACOperator,
    LinearizedCurvature,
    LowRankOperator,
)

__version__ = "0.1.0"

__all__ = [
    # derivatives of a function of one tensor
    "fd_hvp",
    "FiniteDifferenceWarning",
    "fisher_vp",
    "ggn_vp",
    "hessian",
    "hvp",
    "linearize_hvp",
    # models: batches, outputs, the second-order context
    "ModelIO",
    "second_order",
    # curvature operators
    "CurvatureOperator",
    "DenseOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearizedCurvature",
    "DiagonalOperator",
    "FunctionHessian",
    "LowRankOperator",
    "KFACOperator",
    "EKFACOperator",
    "InverseOperator",
    "low_rank",
    # analysis
    "ConvexityReport",
    "Verdict",
    "condition_number",
    "convexity",
    "diagonal",
    "eigenvalues",
    "layer_report",
    "spectral_density",
    "trace",
    "Status",
    # optimisation
    "FiniteSum",
    "OptimizeResult",
    "OptimizeWarning",
    "minimize",
    # compression
    "PruneReport",
    "prune",
    # core
    "NonFiniteError",
    "progress",
    "ParamSpace",
    # modules
    "analysis",
    "distributed",
    "func",
    "linalg",
    "operators",
    "optim",
    "solvers",
]
