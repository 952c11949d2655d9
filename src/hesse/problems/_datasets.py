"""Machine-learning problems on data that ships with scikit-learn (no download).

Each :class:`Problem` is data, a model and a loss, nothing more: the training and test
sets as tensors, a factory for a fresh model, the loss, an optional L2 penalty and, for the
convex ones, the training objective as a function of the flat parameter vector (for
:func:`hesse.minimize`). The features are standardised with the training set's statistics;
the split is 75/25 with a fixed seed.

scikit-learn is needed (the ``cli`` extra: ``pip install 'hesse[cli]'``).

Example:
    >>> from hesse.problems import problem
    >>> p = problem("logistic-breast-cancer")
    >>> p.train[0].shape, p.num_parameters
    (torch.Size([426, 30]), 31)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hesse._minimize import FiniteSum

Data = tuple[Tensor, Tensor]

#: Label smoothing of the networks' cross-entropy. The networks can fit the digits
#: exactly; with plain cross-entropy the training loss then tends to zero and its Hessian
#: vanishes with it. Smoothed targets give the loss a finite minimum, where the Hessian
#: is worth looking at.
SMOOTHING = 0.1


def _smoothed_entropy(classes: int, smoothing: float = SMOOTHING) -> float:
    """The entropy of a smoothed one-hot target: the least cross-entropy any output has."""
    hit, miss = 1 - smoothing + smoothing / classes, smoothing / classes
    return -(hit * math.log(hit) + (classes - 1) * miss * math.log(miss))


@dataclass(frozen=True)
class Problem:
    """A model, a loss and the data to fit, with the objective that training minimises.

    The objective is ``loss_fn(model(X), y) + l2 / 2 * sum of |p|^2`` over the parameters
    named in ``penalized``, on the training set.

    Attributes:
        name: Registry name, e.g. ``"mlp-digits"``.
        description: One line for listings.
        task: ``"regression"`` or ``"classification"``.
        make_model: Builds a fresh model with the problem's dtype and device (random layers
            draw from torch's global generator: seed it first).
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        train, test: ``(inputs, targets)``.
        l2: The penalty's coefficient (0 for none).
        penalized: Names of the penalised parameters (``model.named_parameters()``).
        convex: Whether the objective is convex in the parameters.
        loss_floor: The infimum of the loss over all outputs (0, or with smoothed labels
            their entropy): the training loss minus it is what a better fit can still gain.
    """

    name: str
    description: str
    task: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    train: Data
    test: Data
    l2: float = 0.0
    penalized: tuple[str, ...] = ()
    convex: bool = False
    loss_floor: float = 0.0

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters of the model."""
        with torch.random.fork_rng(devices=[]):  # building a model draws random numbers
            model = self.make_model()
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    @property
    def metric_name(self) -> str:
        """What :meth:`metric` measures on the test set."""
        return "accuracy" if self.task == "classification" else "R²"

    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        """Accuracy (classification) or the coefficient of determination R² (regression)."""
        outputs, targets = outputs.detach(), targets.detach()
        if self.task == "classification":
            if outputs.shape[-1] == 1:
                hits = (outputs.squeeze(-1) > 0) == (targets.squeeze(-1) > 0.5)
            else:
                hits = outputs.argmax(-1) == targets
            return float(hits.double().mean())
        residual = ((outputs - targets) ** 2).sum()
        total = ((targets - targets.mean()) ** 2).sum()
        return float(1 - residual / total)

    def regularizer(self, model: nn.Module) -> Tensor | None:
        """The penalty ``l2 / 2 * sum |p|^2`` at the model's parameters (``None`` if none)."""
        if not self.l2:
            return None
        params = dict(model.named_parameters())
        return 0.5 * self.l2 * sum((params[n] ** 2).sum() for n in self.penalized)

    def objective(
        self, model: nn.Module, batch_size: int | None = None
    ) -> tuple[FiniteSum, Tensor]:
        """The training objective as a function of one flat parameter vector.

        Args:
            model: Gives the architecture and the layout of the vector (the concatenation
                of its parameters in order); it is not changed.
            batch_size: the :class:`hesse.FiniteSum`'s ``batch_size`` (evaluations over
                chunks of that many samples; ``None``: all at once).

        Returns:
            ``(fun, w)``: ``fun(w)`` is the objective on the training set at the flat
            parameters ``w`` (a :class:`hesse.FiniteSum` of the loss over the training
            samples and the penalty, so that :func:`hesse.minimize`'s subsampling methods
            take it too); ``w`` is the model's current parameters, flattened.
        """
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]
        penalized = set(self.penalized)
        loss_fn = self.loss_fn

        def tensors(w: Tensor) -> dict[str, Tensor]:
            return dict(zip(names, (c.view(s) for c, s in zip(torch.split(w, sizes), shapes))))

        def loss(w: Tensor, batch: Data) -> Tensor:
            X, y = batch
            return loss_fn(torch.func.functional_call(model, tensors(w), (X,)), y)

        def penalty(w: Tensor) -> Tensor:
            return (
                0.5 * self.l2 * sum((t**2).sum() for n, t in tensors(w).items() if n in penalized)
            )

        reduction = getattr(loss_fn, "reduction", "mean")
        fun = FiniteSum(
            loss,
            self.train,
            regularizer=penalty if self.l2 else None,
            reduction="sum" if reduction == "sum" else "mean",
            hessian=_dense_hessian(model, loss_fn, self.train),
            batch_size=batch_size,
        )
        return fun, torch.cat([p.detach().reshape(-1) for p in params])


def _dense_hessian(
    model: nn.Module, loss_fn: Any, data: Data
) -> Callable[[Tensor, Data], Tensor] | None:
    """The loss's Hessian on a batch as a dense matrix, by
    :func:`hesse.optim.SubsampledNewton`'s dense curvature (closed form for a linear
    model), on a private copy of the model that takes the flat point; ``None`` where the
    loss has no closed-form output curvature, or the model's outputs are not linear in its
    parameters (the Hessian's second term, ``P`` forward-over-reverse passes under
    ``vmap``, costs more time and far more memory than autograd's products: over 20 GB for
    the CNN on the digits)."""
    from hesse.func._model import ModelLoss
    from hesse.func._output import OutputCurvature
    from hesse.operators._dense import _has_second_term, dense_model_curvature

    try:
        curvature = OutputCurvature(loss_fn)
    except (TypeError, ValueError):
        return None
    twin = copy.deepcopy(model)
    fn = ModelLoss(twin, loss_fn)
    if _has_second_term(fn, fn.params(), data, fn.io.samples(data)):
        return None

    dtype = next((p.dtype for p in twin.parameters()), None)
    twins = {dtype: (twin, fn)}

    def hessian(w: Tensor, batch: Data) -> Tensor:
        if w.dtype not in twins:  # a float32 stage of hesse.minimize(precision="mixed"):
            # its own copy, so that the first twin's buffers and frozen parameters are
            # never rounded through another dtype and back
            other = copy.deepcopy(twin).to(w.dtype)
            twins[w.dtype] = (other, ModelLoss(other, loss_fn))
        model_w, fn_w = twins[w.dtype]
        load_into(model_w, w.detach())
        return dense_model_curvature(fn_w, curvature, batch, hessian=True)

    return hessian


def load_into(model: nn.Module, w: Tensor) -> None:
    """Copy the flat vector ``w`` into the model's trainable parameters, in order."""
    with torch.no_grad():
        i = 0
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(w[i : i + p.numel()].view_as(p))
                i += p.numel()


def _sklearn() -> Any:
    try:
        import sklearn.datasets
        import sklearn.model_selection
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "hesse's data problems need scikit-learn: pip install 'hesse[cli]'"
        ) from err
    return sklearn


def _split(X: np.ndarray, y: np.ndarray, stratify: bool) -> tuple[np.ndarray, ...]:
    sk = _sklearn()
    return sk.model_selection.train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y if stratify else None
    )


def _standardise(Xtr: np.ndarray, Xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    return (Xtr - mean) / std, (Xte - mean) / std


def _zeros(model: nn.Module) -> nn.Module:
    """A linear model starts at zero: the objective is convex, the start the usual one."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _as(t: np.ndarray, dtype: torch.dtype, device: Any) -> Tensor:
    return torch.as_tensor(t, device=device).to(dtype)


def _linear_diabetes(dtype, device) -> Problem:
    X, y = _sklearn().datasets.load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y, stratify=False)
    Xtr, Xte = _standardise(Xtr, Xte)
    mu, sd = ytr.mean(), ytr.std()
    ytr, yte = (ytr - mu) / sd, (yte - mu) / sd
    d = X.shape[1]
    return Problem(
        "linear-diabetes",
        "least squares, diabetes (10 features, standardised target)",
        "regression",
        lambda: _zeros(nn.Linear(d, 1).to(dtype=dtype, device=device)),
        nn.MSELoss(),
        (_as(Xtr, dtype, device), _as(ytr[:, None], dtype, device)),
        (_as(Xte, dtype, device), _as(yte[:, None], dtype, device)),
        convex=True,
    )


def _logistic_breast_cancer(dtype, device) -> Problem:
    X, y = _sklearn().datasets.load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y, stratify=True)
    Xtr, Xte = _standardise(Xtr, Xte)
    d = X.shape[1]
    return Problem(
        "logistic-breast-cancer",
        "binary logistic regression, breast cancer (30 features), L2 1e-3",
        "classification",
        lambda: _zeros(nn.Linear(d, 1).to(dtype=dtype, device=device)),
        nn.BCEWithLogitsLoss(),
        (_as(Xtr, dtype, device), _as(ytr[:, None], dtype, device)),
        (_as(Xte, dtype, device), _as(yte[:, None], dtype, device)),
        l2=1e-3,
        penalized=("weight",),
        convex=True,
    )


def _digits(dtype, device, images: bool) -> tuple[Data, Data]:
    X, y = _sklearn().datasets.load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X / 16.0, y, stratify=True)
    if images:
        Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    train = (_as(Xtr, dtype, device), torch.as_tensor(ytr, device=device))
    test = (_as(Xte, dtype, device), torch.as_tensor(yte, device=device))
    return train, test


def _logistic_digits(dtype, device) -> Problem:
    train, test = _digits(dtype, device, images=False)
    return Problem(
        "logistic-digits",
        "multinomial logistic regression, digits (8x8, 10 classes), L2 1e-3",
        "classification",
        lambda: _zeros(nn.Linear(64, 10).to(dtype=dtype, device=device)),
        nn.CrossEntropyLoss(),
        train,
        test,
        l2=1e-3,
        penalized=("weight",),
        convex=True,
    )


def _mlp_digits(dtype, device) -> Problem:
    train, test = _digits(dtype, device, images=False)
    return Problem(
        "mlp-digits",
        "MLP 64-64-10 (tanh), digits, cross-entropy (label smoothing 0.1)",
        "classification",
        lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(
            dtype=dtype, device=device
        ),
        nn.CrossEntropyLoss(label_smoothing=SMOOTHING),
        train,
        test,
        loss_floor=_smoothed_entropy(10),
    )


def _cnn_digits(dtype, device) -> Problem:
    train, test = _digits(dtype, device, images=True)
    return Problem(
        "cnn-digits",
        "CNN conv3x3(8)-conv3x3(16, stride 2)-linear (tanh), digits, cross-entropy (label "
        "smoothing 0.1)",
        "classification",
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        ).to(dtype=dtype, device=device),
        nn.CrossEntropyLoss(label_smoothing=SMOOTHING),
        train,
        test,
        loss_floor=_smoothed_entropy(10),
    )


#: The feature models of :func:`synthetic_logistic`.
FEATURES = ("independent", "correlated")


def synthetic_logistic(
    n: int = 200_000,
    d: int = 100,
    *,
    features: str = "independent",
    rho: float = 0.999,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    r"""L2-regularised binary logistic regression on seeded synthetic data: tall
    (:math:`n \gg d`), for second-order methods on large data.

    Features :math:`x_i \sim N(0, \Sigma)` with :math:`\Sigma = I` (``"independent"``) or
    :math:`\Sigma_{jk} = \rho^{|j-k|}` (``"correlated"``, an AR(1) process along the
    features: eigenvalues from :math:`(1-\rho)/(1+\rho)` to :math:`(1+\rho)/(1-\rho)`, a
    condition number of :math:`4 \cdot 10^6` at :math:`\rho = 0.999`, which first-order
    methods feel); labels :math:`y_i \sim \mathrm{Bernoulli}(\sigma(x_i^\top w^* + b^*))`
    for a seeded :math:`w^* \sim N(0, I/d)` scaled to :math:`\|w^*\|_\Sigma = 3`
    (a noisy, not separable, problem) and :math:`b^* = 0.5`. The model is
    ``nn.Linear(d, 1)`` from zero, the loss ``BCEWithLogitsLoss`` and the penalty
    :math:`\lambda = 1/n` on the weight (not the intercept): the objective of
    scikit-learn's ``LogisticRegression(C=1)``. The test set is 10% more draws.

    Args:
        n, d: samples and features of the training set.
        features: ``"independent"`` or ``"correlated"``.
        rho: the correlation of neighbouring features for ``"correlated"``.
        seed: the seed of every draw (data and :math:`w^*`), on the CPU.
        dtype, device: of the tensors and the model.

    Example:
        >>> p = synthetic_logistic(1000, 5, features="correlated")
        >>> p.train[0].shape, p.l2
        (torch.Size([1000, 5]), 0.001)
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    for name, v in (("n", n), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")
    gen = torch.Generator().manual_seed(seed)
    n_test = max(1, n // 10)
    Z = torch.randn(n + n_test, d, generator=gen, dtype=torch.float64)
    if features == "correlated":  # AR(1) along the features: x_j = rho x_{j-1} + ...
        X = torch.empty_like(Z)
        X[:, 0] = Z[:, 0]
        s = math.sqrt(1 - rho * rho)
        for j in range(1, d):
            X[:, j] = rho * X[:, j - 1] + s * Z[:, j]
        idx = torch.arange(d, dtype=torch.float64)
        cov = rho ** (idx[:, None] - idx[None, :]).abs()
    else:
        X, cov = Z, torch.eye(d, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    w *= 3.0 / math.sqrt(float(w @ cov @ w))
    p = torch.sigmoid(X @ w + 0.5)
    y = (torch.rand(n + n_test, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    dev = torch.device(device) if device is not None else None
    Xt, yt = X.to(dtype=dtype, device=dev), y[:, None].to(dtype=dtype, device=dev)
    kind = f"AR(1) features, rho {rho:g}" if features == "correlated" else "independent features"
    return Problem(
        f"logistic-synthetic-{features}",
        f"binary logistic regression, {n} x {d} synthetic ({kind}), L2 1/n",
        "classification",
        lambda: _zeros(nn.Linear(d, 1).to(dtype=dtype, device=dev)),
        nn.BCEWithLogitsLoss(),
        (Xt[:n], yt[:n]),
        (Xt[n:], yt[n:]),
        l2=1.0 / n,
        penalized=("weight",),
        convex=True,
    )


def _synthetic(name: str, features: str) -> Callable[..., Problem]:
    def build(dtype, device, samples: int) -> Problem:
        p = synthetic_logistic(samples, 100, features=features, seed=0, dtype=dtype, device=device)
        return dataclasses.replace(p, name=name)

    return build


#: name -> (builder(dtype, device), default dtype)
_BUILDERS: dict[str, tuple[Callable[..., Problem], torch.dtype]] = {
    "linear-diabetes": (_linear_diabetes, torch.float64),
    "logistic-breast-cancer": (_logistic_breast_cancer, torch.float64),
    "logistic-digits": (_logistic_digits, torch.float64),
    "mlp-digits": (_mlp_digits, torch.float32),
    "cnn-digits": (_cnn_digits, torch.float32),
    "logistic-tall": (_synthetic("logistic-tall", "independent"), torch.float64),
    "logistic-correlated": (_synthetic("logistic-correlated", "correlated"), torch.float64),
}
#: The synthetic problems, whose number of training samples can be chosen, and their
#: default (small enough for ``hesse compare`` in seconds; ``benchmarks/logistic.py``
#: measures n = 200,000 and 100,000).
SCALABLE: dict[str, int] = {"logistic-tall": 10_000, "logistic-correlated": 5_000}

#: The names of the data problems.
PROBLEMS: tuple[str, ...] = tuple(_BUILDERS)


def problem(
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    samples: int | None = None,
) -> Problem:
    """The data problem called ``name``, its tensors in ``dtype`` on ``device``.

    ``logistic-tall`` and ``logistic-correlated`` are :func:`synthetic_logistic` (seed 0,
    100 features, independent or AR(1) with correlation 0.999) with :data:`SCALABLE`'s
    number of samples unless ``samples`` says otherwise.

    Args:
        name: One of :data:`PROBLEMS`.
        dtype: Floating dtype of the data and model (default: float64 for the linear
            problems, float32 for the networks).
        device: Where the data and model live (default: CPU).
        samples: Training samples of a problem in :data:`SCALABLE` (the others have the
            size of their data set).

    Returns:
        A :class:`Problem`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    build, default = _BUILDERS[name]
    dev = torch.device(device) if device is not None else None
    if name in SCALABLE:
        n = SCALABLE[name] if samples is None else samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"samples must be an integer >= 1, got {n!r}")
        return build(dtype or default, dev, n)
    if samples is not None:
        raise ValueError(
            f"samples applies to the synthetic problems ({', '.join(SCALABLE)}); {name} has "
            "the size of its data set"
        )
    return build(dtype or default, dev)
