"""Layer 2: derivative primitives built on :mod:`torch.func`."""

from hesse.func._context import second_order
from hesse.func._io import ModelIO
from hesse.func._model import ModelLoss
from hesse.func._output import LIKELIHOODS, OutputCurvature, loss_normalizer, output_curvature
from hesse.func._tensor import (
    DEFAULT_HVP_MODE,
    HVP_MODES,
    FiniteDifferenceWarning,
    fd_hvp,
    fd_step,
    hessian,
    hvp,
    linearize_hvp,
)
from hesse.func._vp import fisher_vp, ggn_vp

__all__ = [
    "DEFAULT_HVP_MODE",
    "FiniteDifferenceWarning",
    "HVP_MODES",
    "LIKELIHOODS",
    "ModelIO",
    "ModelLoss",
    "OutputCurvature",
    "fd_hvp",
    "fd_step",
    "fisher_vp",
    "ggn_vp",
    "hessian",
    "hvp",
    "linearize_hvp",
    "loss_normalizer",
    "output_curvature",
    "second_order",
]
