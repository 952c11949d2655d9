"""Layer 7 (front end): Hessian-based compression.

:func:`prune` removes a share of the weights of a model's linear and convolutional
layers, in place: magnitude pruning (the baseline), Optimal Brain Damage and global
Optimal Brain Surgeon on the curvature of the loss, and the layer-wise OBS methods of
Frantar et al. (ExactOBS / OBC, SparseGPT) on each layer's reconstruction error, with
N:M semi-structured patterns. It returns a :class:`PruneReport` whose masks keep the
sparsity through fine-tuning.
"""

from hesse.compress._layers import SUPPORTED, default_layers
from hesse.compress._prune import METHODS, OBS_MAX_PARAMS, prune
from hesse.compress._report import LayerPrune, PruneReport

__all__ = [
    "METHODS",
    "OBS_MAX_PARAMS",
    "SUPPORTED",
    "LayerPrune",
    "PruneReport",
    "default_layers",
    "prune",
]
