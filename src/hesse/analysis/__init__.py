"""Layer 5: questions about curvature — spectrum, trace, density, conditioning, convexity,
per-layer reports."""

from hesse.analysis._convexity import ConvexityReport, Verdict, convexity, verdict
from hesse.analysis._layers import LayerReport, LayerRow, layer_report, parameter_blocks
from hesse.analysis._spectrum import (
    ConditionResult,
    condition_number,
    diagonal,
    eigenvalues,
    spectral_density,
    trace,
)

__all__ = [
    "ConditionResult",
    "ConvexityReport",
    "LayerReport",
    "LayerRow",
    "Verdict",
    "condition_number",
    "convexity",
    "diagonal",
    "eigenvalues",
    "layer_report",
    "parameter_blocks",
    "spectral_density",
    "trace",
    "verdict",
]
