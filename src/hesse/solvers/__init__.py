"""Layer 6: the mathematics of each optimisation method, written once.

Descent directions (modified Newton, truncated CG), quasi-Newton updates (BFGS, DFP, SR1,
the L-BFGS two-loop recursion), line searches (backtracking Armijo, strong Wolfe), trust
regions (a subproblem object per method and a size rule), the escape from saddle points
along negative curvature, and default tolerances, as pure functions and small state
objects over flat tensors.
:func:`hesse.minimize` and :mod:`hesse.optim` drive these; neither has its own copy.
"""

from hesse.solvers._diagonal import (
    AdaHessianState,
    SophiaState,
    adahessian_init,
    adahessian_update,
    gnb_diagonal,
    hutchinson_diagonal_probe,
    rademacher_like,
    sophia_init,
    sophia_update,
    spatial_average,
)
from hesse.solvers._escape import (
    EscapeStep,
    escape_direction,
    escape_saddle,
    negative_curvature,
)
from hesse.solvers._iterate import (
    Descent,
    Iteration,
    LBFGSDescent,
    NewtonDescent,
    search_iteration,
)
from hesse.solvers._linesearch import (
    LINE_SEARCHES,
    LineSearchResult,
    armijo,
    cubic_minimizer,
    fixed_step,
    initial_step,
    line_search,
    repeat_decrease_step,
    strong_wolfe,
)
from hesse.solvers._newton import (
    CORRECTIONS,
    NewtonStep,
    cholesky_newton,
    damped_newton,
    damped_newton_step,
    eigen_floor,
    eigen_newton,
    lm_damping,
    martens_damping,
    shifted_cholesky,
    subsample_size,
    truncated_newton,
)
from hesse.solvers._point import Point
from hesse.solvers._quasi_newton import (
    LBFGSMemory,
    bfgs_update,
    curvature_pair,
    dfp_update,
    initial_scale,
    sr1_update,
)
from hesse.solvers._stopping import Tolerances, default_tolerances, forcing_rtol
from hesse.solvers._trust import (
    ETA,
    DampedSubproblem,
    ExactSubproblem,
    NielsenDamping,
    SteihaugPath,
    TrustRadius,
    TrustStep,
    TrustSubproblem,
    exact_step,
    steihaug_step,
    update_radius,
)

__all__ = [
    # diagonal estimates, AdaHessian and Sophia
    "AdaHessianState",
    "SophiaState",
    "adahessian_init",
    "adahessian_update",
    "gnb_diagonal",
    "hutchinson_diagonal_probe",
    "rademacher_like",
    "sophia_init",
    "sophia_update",
    "spatial_average",
    # saddle escape
    "EscapeStep",
    "escape_direction",
    "escape_saddle",
    "negative_curvature",
    # the iteration of the line-search methods, and the point it stands at
    "Descent",
    "Iteration",
    "LBFGSDescent",
    "NewtonDescent",
    "Point",
    "search_iteration",
    # line searches
    "LINE_SEARCHES",
    "LineSearchResult",
    "armijo",
    "cubic_minimizer",
    "fixed_step",
    "initial_step",
    "line_search",
    "repeat_decrease_step",
    "strong_wolfe",
    # Newton directions
    "CORRECTIONS",
    "NewtonStep",
    "cholesky_newton",
    "damped_newton",
    "damped_newton_step",
    "eigen_floor",
    "eigen_newton",
    "lm_damping",
    "martens_damping",
    "shifted_cholesky",
    "subsample_size",
    "truncated_newton",
    # quasi-Newton
    "LBFGSMemory",
    "bfgs_update",
    "curvature_pair",
    "dfp_update",
    "initial_scale",
    "sr1_update",
    # trust regions
    "ETA",
    "DampedSubproblem",
    "ExactSubproblem",
    "NielsenDamping",
    "SteihaugPath",
    "TrustRadius",
    "TrustStep",
    "TrustSubproblem",
    "exact_step",
    "steihaug_step",
    "update_radius",
    # stopping
    "Tolerances",
    "default_tolerances",
    "forcing_rtol",
]
