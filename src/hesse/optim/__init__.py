"""Second-order optimizers for models, as ``torch.optim.Optimizer`` subclasses (layer 7).

They drive :mod:`hesse.solvers` (truncated CG, line searches, quasi-Newton memory, the
diagonal estimator) and :mod:`hesse.operators` (curvature on a batch). First-order
baselines are torch.optim's own; :func:`compare` trains one problem with any of them on
equal terms.
"""

from hesse.optim._base import create_graph
from hesse.optim._compare import Curve, compare
from hesse.optim._diagonal import AdaHessian, Sophia
from hesse.optim._kfac import KFAC
from hesse.optim._lbfgs import LBFGS
from hesse.optim._newton import HessianFree, NewtonCG, SubsampledNewton

__all__ = [
    # truncated Newton
    "HessianFree",
    "NewtonCG",
    "SubsampledNewton",
    # quasi-Newton
    "LBFGS",
    # diagonal curvature
    "AdaHessian",
    "Sophia",
    # Kronecker-factored curvature
    "KFAC",
    # comparisons
    "Curve",
    "compare",
    # utilities
    "create_graph",
]
