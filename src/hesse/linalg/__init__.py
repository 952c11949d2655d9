"""Layer 4: matrix-free algorithms on anything with ``@`` (hesse operators, dense tensors).

Each routine returns a frozen result with its estimate, its error or residual, the number
of products and a status; none raises on non-convergence.
"""

from hesse.linalg._common import NotConvergedError, Status
from hesse.linalg._density import DensityResult, slq_nodes, spectral_density
from hesse.linalg._diag import DiagonalResult, exact_diagonal, hutchinson_diagonal, xdiag
from hesse.linalg._eigen import EigenResult, lanczos, power_iteration
from hesse.linalg._lowrank import ConvergenceWarning, InverseOperator, low_rank
from hesse.linalg._solve import SolveResult, cg, minres
from hesse.linalg._trace import TraceResult, hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    # solvers
    "SolveResult",
    "cg",
    "minres",
    "InverseOperator",
    "ConvergenceWarning",
    # eigenvalues
    "EigenResult",
    "lanczos",
    "power_iteration",
    "low_rank",
    # trace and diagonal
    "TraceResult",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "DiagonalResult",
    "exact_diagonal",
    "hutchinson_diagonal",
    "xdiag",
    # spectral density
    "DensityResult",
    "slq_nodes",
    "spectral_density",
    # statuses
    "NotConvergedError",
    "Status",
]
