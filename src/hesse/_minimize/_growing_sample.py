r"""The warm start of ``minimize(FiniteSum, "subsampled-newton")`` on tall data: the
objective is minimised first on nested random samples of growing size (the dynamic sample
size of Byrd, Chin, Nocedal & Wu 2012, "Sample size selection in optimization methods for
machine learning"), each until its gradient is within its own sampling noise, so that the
iterations over all the data start near the full minimiser.

Why it pays: an iteration on ``m`` samples costs ``m / n`` of one on all ``n``, and until
the gradient falls to the sampling noise of ``m`` samples the full gradient is no better a
guide than the sample's. A phase on ``m`` samples ends when

.. math:: \|g_S(x)\|_2 \le \theta\,\sigma_S, \qquad
    \sigma_S = \tfrac12 \|\bar g_A - \bar g_B\|_2 \sqrt{1 - m/n}

(the norm test; :math:`\bar g_A, \bar g_B` the gradients of the loss on the sample's two
random halves, each an estimate of the full gradient, measured in the phase's first
evaluation at no extra cost: the sample is evaluated as its two halves;
:math:`\tfrac12\|\bar g_A - \bar g_B\|` estimates the standard error
:math:`\sqrt{\operatorname{tr}\Sigma / m}` of the sample's mean gradient, and the root the
finite population's correction). Then the sample grows :data:`GROWTH`-fold, while it is at
most half the data; the last phase hands its point to the loop over all the data.

Logistic regression, ``n = 200000``, ``P = 101``, to :math:`\|g\| \le 10^{-6}\|g(0)\|`:
phases of 1010 and 10100 samples leave the full gradient at 0.1-0.14 of the start's in
20-30 ms, under one evaluation over all the data (43 ms), and the loop over all the data
then needs 7 evaluations instead of 9 (``benchmarks/logistic.py``; 5 instead of 9 with
correlated features).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hesse._core._checks import derive_seed
from hesse._core._status import Status
from hesse._minimize._finite_sum import FiniteSum
from hesse._minimize._objective import Objective
from hesse._minimize._run import Run, Stop
from hesse.func._io import first_tensor
from hesse.solvers import Tolerances

#: Each phase's sample is this many times the last one's.
GROWTH = 10
#: A phase ends when its gradient's 2-norm is at most this many times its sampling noise.
THETA = 1.0
#: A phase whose start's gradient is within this many times its noise takes no step: at a
#: minimiser ``|g_S|`` is about the noise itself, so the test of :data:`THETA` would move
#: a start that is already a solution (a restart, the last point of a path) half the time;
#: the ratio of the two estimates is F-distributed, with as few degrees of freedom as the
#: gradient's covariance has dominant directions, so 2 would still move one now and then.
START_THETA = 3.0
#: ``gradient_sample="auto"``: the first phase's samples per unknown.
AUTO_SAMPLES_PER_UNKNOWN = 10
#: The most iterations of one phase (Newton on a sample takes a few; a phase that has not
#: passed its test by then hands its point on).
PHASE_MAX_ITER = 100


class SampleSum(FiniteSum):
    """``fs``'s objective on its samples at ``idx`` (``m`` of ``n``), an estimate of the
    full objective: the loss's mean over them, or for ``reduction="sum"`` their sum times
    ``n / m``, plus the regulariser. Evaluated as the sample's two halves, so that every
    evaluation also leaves the gradient's sampling noise :math:`\\sigma_S` in ``noise``."""

    def __init__(self, fs: FiniteSum, idx: Tensor):
        n, m = fs.samples, int(idx.numel())
        factor = n / m if fs.reduction == "sum" else 1.0
        loss, hessian = fs.loss, fs.hessian
        if factor != 1.0:
            loss = _scaled(fs.loss, factor)
            hessian = None if fs.hessian is None else _scaled(fs.hessian, factor)
        super().__init__(
            loss,
            fs.subsample(idx),
            regularizer=fs.regularizer,
            reduction=fs.reduction,
            hessian=hessian,
            batch_size=fs.batch_size,
        )
        self._per_sample = fs._per_sample  # fs's tensors of samples, not by size here
        self.population = n
        half = m // 2
        self.halves = (self._take(self.data, slice(0, half)), self._take(self.data, slice(half, m)))
        self.noise = math.nan

    @property
    def chunked(self) -> bool:
        return True  # every evaluation goes through _value_and_grad: the halves

    def _value_and_grad(self, x: Tensor, shape, parts=None) -> tuple[Tensor, Tensor | None, bool]:
        if parts is not None:
            return super()._value_and_grad(x, shape, parts)
        m = self.samples
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        g = torch.zeros_like(x)
        reached = False
        estimates = []
        for half in self.halves:
            k = int(first_tensor(half).shape[0])
            weight = k / m if self.reduction == "mean" else 1.0
            value, gh, r = super()._value_and_grad(x, shape, self.chunks(half, weight))
            total = total + value
            reached = reached or r
            if gh is None:
                return total, None, reached
            g += gh
            estimates.append(gh * (m / k))  # the half's own estimate of the full gradient
        if self.regularizer is not None:
            value, gr, r = super()._value_and_grad(x, shape, [(None, 1.0)])
            total = total + value
            reached = reached or r
            if gr is None:
                return total, None, reached
            g += gr
        spread = float(torch.linalg.vector_norm(estimates[0] - estimates[1]))
        self.noise = 0.5 * spread * math.sqrt(max(0.0, 1.0 - m / self.population))
        return total, g, reached


def _scaled(f, factor: float):
    return lambda x, batch: f(x, batch) * factor


class _PhaseRun(Run):
    """A phase's run: no callback, history or saddle check; its gradient test, set at its
    first evaluation, is the norm test against that evaluation's sampling noise (or the
    whole run's ``gtol``, if that is larger: a sample's gradient need not be smaller than
    the one asked of all the data's); a start within :data:`START_THETA` times the noise
    passes it at once."""

    def __init__(self, parent: Run, obj: Objective, sample: SampleSum, max_iter: int):
        super().__init__(
            parent.method,
            obj,
            Tolerances(gtol=0.0, norm=2),
            max_iter,
            parent.max_fev,
            None,
            False,
            False,
            parent.curvature_tol,
        )
        self.sample, self.floor = sample, parent.tol.gtol

    def first(self, x0: Tensor, graph: bool):
        pt = super().first(x0, graph)
        noise = self.sample.noise
        at_start = START_THETA if pt.g_norm(2) <= START_THETA * noise else THETA
        self.tol = Tolerances(gtol=max(at_start * noise, self.floor), norm=2)
        return pt


def first_sample(option: Any, n: int, P: int) -> int | None:
    """The first phase's samples from ``gradient_sample`` (``None``: no phases; ``"auto"``:
    :data:`AUTO_SAMPLES_PER_UNKNOWN` per unknown), or ``None`` where not even that one fits
    in half the data.

    Example:
        >>> first_sample("auto", 200000, 101), first_sample("auto", 2000, 101)
        (1010, None)
        >>> first_sample(0.01, 200000, 101), first_sample(None, 200000, 101)
        (2000, None)
    """
    if option is None:
        return None
    if option == "auto":
        m = AUTO_SAMPLES_PER_UNKNOWN * P
    elif isinstance(option, int):
        m = option
    else:
        m = max(2, round(option * n))
    return m if 2 * m <= n else None


def check_gradient_sample(value: Any) -> Any:
    """``gradient_sample``: ``None``, ``"auto"``, an int >= 2 or a fraction in (0, 0.5]."""
    ok = (
        value is None
        or value == "auto"
        or (isinstance(value, int) and not isinstance(value, bool) and value >= 2)
        or (isinstance(value, float) and 0 < value <= 0.5)
    )
    if not ok:
        raise ValueError(
            "gradient_sample must be 'auto', None (the full gradient from the start), the "
            "samples of the first phase (an int >= 2) or a fraction of them in (0, 0.5], "
            f"got {value!r}"
        )
    return value


def sample_phases(run: Run, fs: FiniteSum, x: Tensor, options: dict, loop, base: int, cap: int):
    """The point the loop over all the data starts from: ``x`` after the phases on nested
    samples (``loop``, subsampled Newton, on each :class:`SampleSum`; its curvature on at
    most ``base`` samples at first and ``cap`` at most, like the full loop's), or ``x``
    itself where there are none. The phases leave at least one of ``run``'s iterations to
    the full loop; their iterations count in ``run.nit``, their dense Hessians in
    ``nhev``; their evaluations, on at most half the data, are not counted in ``nfev``.
    ``run.damping`` becomes the damping of the last phase that passed its test (where one
    fails, the next starts again from ``options["damping"]``)."""
    n = fs.samples
    m = first_sample(options["gradient_sample"], n, x.numel())
    if m is None:
        return x
    gen = torch.Generator().manual_seed(derive_seed(options["seed"], "gradient-sample"))
    index = torch.int32 if n < 2**31 else torch.int64  # 4 bytes a sample for the draw
    perm = torch.randperm(n, generator=gen, dtype=index)  # nested: prefixes of one draw
    phase_options = {**options, "gradient_sample": None}
    while 2 * m <= n:
        budget = min(PHASE_MAX_ITER, run.max_iter - run.nit - 1)
        if budget < 1:
            break
        half = m // 2
        idx = torch.cat([perm[:half].sort().values, perm[half:m].sort().values]).long()
        sample = SampleSum(fs, idx)
        sub = _PhaseRun(run, Objective(sample, x.view(run.obj.shape)), sample, budget)
        phase_options["subsample"] = min(base, m)
        phase_options["subsample_max"] = min(cap, m)
        phase_options["damping"] = run.damping
        status = Status.CONVERGED
        try:
            loop(sub, sample, x, phase_options)
        except Stop as stop:
            status = stop.status
        run.nit += sub.nit
        run.obj.counts.nhev += sub.obj.counts.nhev
        if sub.current is None:  # not finite on this sample at x: leave x to the full loop
            break
        if sub.current.finite:
            x = sub.current.x
        run.damping = sub.damping if status == Status.CONVERGED else options["damping"]
        m *= GROWTH
    return x
