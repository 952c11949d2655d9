"""Data-parallel curvature and optimizers over ``torch.distributed`` (layer 7).

Launch with ``torchrun`` (or any launcher that calls
``torch.distributed.init_process_group``); give each rank its shard of the data. The
operators here are hesse's own with one change: a product is every rank's size-weighted
sum over its batches, all-reduced with the sample counts in one collective, so every rank
holds the operator of the loss over all the data. Random probes (Hutchinson, Lanczos
starts, stochastic Lanczos quadrature) are drawn from rank 0's generator state on every
rank, so :func:`hesse.eigenvalues`, :func:`hesse.trace`, :func:`hesse.spectral_density`
and :func:`hesse.linalg.cg` return the same on every rank as one process on all the data.

The optimizers are those of :mod:`hesse.optim`, given a reducer over the process group in
place of the identity (:class:`hesse.optim._base.Reducer`): every evaluation of the
closure (loss, gradient, Hessian-vector products through its graph), every curvature
operator on a batch and every mean they take (:class:`KFAC`'s factors, Sophia's
sampled-label gradient) is reduced, weighted by each rank's ``samples``; the
Kronecker-factored operators reduce their factors likewise.

A rank whose local work raises still joins the collective, flagged: it raises its own
error and every other rank a :class:`RankError` naming it. A rank that exits, crashes or
stops answering makes the others raise :class:`RankError` within ``timeout`` seconds.

With nccl, give each rank its GPU first (``torch.cuda.set_device(local_rank)``): CPU
tensors are reduced on the current device. The nccl path has not been run on hardware
yet (only gloo is tested).

Example (``torchrun --nproc-per-node 2 examples/distributed.py``)::

    torch.distributed.init_process_group("gloo")
    H = hesse.distributed.HessianOperator(model, loss_fn, my_shard)
    top = hesse.eigenvalues(H, k=1, seed=0)   # the same on every rank
"""

from hesse.distributed._comm import (
    DEFAULT_TIMEOUT,
    Communicator,
    RankError,
    set_default_timeout,
)
from hesse.distributed._operators import (
    EKFACOperator,
    FiniteDifferenceHessian,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    layer_report,
    loss_and_gradient,
)
from hesse.distributed._optim import (
    KFAC,
    LBFGS,
    AdaHessian,
    HessianFree,
    NewtonCG,
    Sophia,
    SubsampledNewton,
)

__all__ = [
    # operators
    "EKFACOperator",
    "FiniteDifferenceHessian",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "layer_report",
    "loss_and_gradient",
    # optimizers
    "AdaHessian",
    "HessianFree",
    "KFAC",
    "LBFGS",
    "NewtonCG",
    "Sophia",
    "SubsampledNewton",
    # plumbing
    "Communicator",
    "DEFAULT_TIMEOUT",
    "RankError",
    "set_default_timeout",
]
