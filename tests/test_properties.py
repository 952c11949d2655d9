"""Malformed arguments thrown at the public API (hypothesis).

Each call replaces one argument of a valid call by an arbitrary value (None, booleans,
strings, NaN and infinite floats, integers far outside any range, lists, tensors of the
wrong shape, objects) and must either succeed or raise one of hesse's documented errors
(``ValueError`` — ``NonFiniteError`` is one — or ``TypeError``) whose message names the
argument; never a raw error of torch, numpy or Python internals, and never a change to
the user's model or tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hesse  # noqa: E402
from hesse.cli import main  # noqa: E402

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


# Sizes stay moderate where a valid value is plausible (a huge but valid budget would only
# make the test slow); far-out integers test the overflow paths.
BAD = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-300, 1e300, 0.5, 2.5]),
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([2**31, 2**63, 2**70, -(2**70)]),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from([(1, 2), {"a": 1}, b"x", 1 + 2j]),
    st.builds(_Opaque),
    st.sampled_from(
        [torch.ones(2), torch.tensor(math.nan), torch.zeros(0), torch.ones(3, dtype=torch.int64)]
    ),
)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    return model, nn.CrossEntropyLoss(), (x, y)


def _snapshot(*objs) -> list[torch.Tensor]:
    out = []
    for o in objs:
        if isinstance(o, nn.Module):
            out += [t.detach().clone() for t in o.state_dict().values()]
        elif isinstance(o, torch.Tensor):
            out.append(o.detach().clone())
        elif isinstance(o, (tuple, list)):
            out += _snapshot(*o)
    return out


def _unchanged(before: list[torch.Tensor], *objs) -> bool:
    after = _snapshot(*objs)
    return len(before) == len(after) and all(
        a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        for a, b in zip(before, after)
    )


def _check(call, names: tuple[str, ...], *watched) -> None:
    """``call()`` succeeds, or raises ValueError/TypeError naming one of ``names``; the
    watched objects are unchanged either way."""
    before = _snapshot(*watched)
    try:
        call()
    except (ValueError, TypeError) as err:
        msg = str(err)
        assert any(n in msg for n in names), f"{type(err).__name__} does not name {names}: {msg}"
    assert _unchanged(before, *watched), "the call changed the user's model or tensors"


# -- analysis on an operator ----------------------------------------------------------
_ANALYSIS = {
    "eigenvalues": (hesse.eigenvalues, {"k": 1}, ["k", "which", "tol", "max_iter", "seed"]),
    "trace": (hesse.trace, {"num_matvecs": 12}, ["method", "num_matvecs", "seed"]),
    "diagonal": (hesse.diagonal, {"num_matvecs": 12}, ["method", "num_matvecs", "seed"]),
    "spectral_density": (
        hesse.spectral_density,
        {"num_probes": 2, "steps": 8, "grid": 50},
        ["num_probes", "steps", "grid", "sigma", "seed"],
    ),
    "condition_number": (hesse.condition_number, {}, ["tol", "max_iter", "seed"]),
    "low_rank": (hesse.low_rank, {"rank": 2}, ["rank", "method", "tol", "oversample", "seed"]),
}
_ANALYSIS_CASES = [(f, a) for f, (_, _, args) in _ANALYSIS.items() for a in args]


@pytest.mark.parametrize(
    ("fn", "arg"), _ANALYSIS_CASES, ids=[f"{f}-{a}" for f, a in _ANALYSIS_CASES]
)
@SETTINGS
@given(value=BAD)
def test_analysis_arguments(fn, arg, value):
    model, loss_fn, batch = _problem()
    func, base, _ = _ANALYSIS[fn]
    H = hesse.GGNOperator(model, loss_fn, batch)
    _check(lambda: func(H, **{**base, arg: value}), (arg,), model, batch)


@SETTINGS
@given(value=BAD)
def test_analysis_of_something_that_is_not_an_operator(value):
    for func in (hesse.eigenvalues, hesse.trace, hesse.condition_number):
        _check(lambda: func(value), ("A", "operator", "matrix", "square"))  # noqa: B023


# -- operators ------------------------------------------------------------------------
_OPERATORS = {
    "HessianOperator": (hesse.HessianOperator, ["params", "mode", "io", "memory_budget"]),
    "GGNOperator": (hesse.GGNOperator, ["params", "io", "likelihood", "memory_budget"]),
    "FisherOperator": (
        hesse.FisherOperator,
        ["params", "kind", "mc_samples", "generator", "likelihood", "io", "memory_budget"],
    ),
    "FiniteDifferenceHessian": (hesse.FiniteDifferenceHessian, ["params", "h", "warn_rtol", "io"]),
}
_OPERATOR_CASES = [(c, a) for c, (_, args) in _OPERATORS.items() for a in args]


@pytest.mark.parametrize(
    ("cls", "arg"), _OPERATOR_CASES, ids=[f"{c}-{a}" for c, a in _OPERATOR_CASES]
)
@SETTINGS
@given(value=BAD)
def test_operator_arguments(cls, arg, value):
    model, loss_fn, batch = _problem()
    make = _OPERATORS[cls][0]

    def call():
        op = make(model, loss_fn, batch, **{arg: value})
        op @ torch.ones(op.shape[1], dtype=op.dtype)

    _check(call, (arg,), model, batch)


@SETTINGS
@given(value=BAD)
def test_operator_operands(value):
    model, loss_fn, batch = _problem()
    H = hesse.HessianOperator(model, loss_fn, batch)
    watched = value if isinstance(value, torch.Tensor) else None
    _check(lambda: H @ value, ("vector", "operand", "matrix", "H @"), model, batch, watched)


@SETTINGS
@given(which=st.sampled_from(["model", "loss_fn", "data"]), value=BAD)
def test_operator_model_loss_and_data(which, value):
    model, loss_fn, batch = _problem()
    args = {"model": model, "loss_fn": loss_fn, "data": batch, which: value}

    def call():
        op = hesse.GGNOperator(args["model"], args["loss_fn"], args["data"])
        op @ torch.ones(op.shape[1], dtype=op.dtype)

    names = {
        "model": ("model",),
        "loss_fn": ("loss_fn",),
        "data": ("data", "batch", "targets", "inputs"),
    }[which]
    _check(call, names, model, batch)


# -- minimize -------------------------------------------------------------------------
def _rosen(x):
    return ((1 - x[:-1]) ** 2).sum() + 10 * ((x[1:] - x[:-1] ** 2) ** 2).sum()


@pytest.mark.parametrize("arg", ["x0", "method", "tol", "max_iter", "options", "callback"])
@SETTINGS
@given(value=BAD)
def test_minimize_arguments(arg, value):
    x0 = torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64)
    kwargs = {"x0": x0, "method": "bfgs", "max_iter": 20, arg: value}
    _check(lambda: hesse.minimize(_rosen, **kwargs), (arg,), x0)


@SETTINGS
@given(key=st.sampled_from(["curvature_tol", "memory", "c1", "c2", "radius", "eta"]), value=BAD)
def test_minimize_options(key, value):
    x0 = torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64)
    for method in ("trust-ncg", "newton", "l-bfgs"):
        _check(
            lambda: hesse.minimize(_rosen, x0, method, max_iter=10, options={key: value}),  # noqa: B023
            (key, "options"),
            x0,
        )


# -- optimizers -----------------------------------------------------------------------
_OPTIMIZERS = {
    "LBFGS": (
        hesse.optim.LBFGS,
        ["lr", "max_iter", "history_size", "tolerance_grad", "line_search"],
    ),
    "NewtonCG": (hesse.optim.NewtonCG, ["lr", "damping", "cg_max_iter", "cg_rtol"]),
    "HessianFree": (
        hesse.optim.HessianFree,
        ["lr", "damping", "cg_max_iter", "warm_start", "seed"],
    ),
    "AdaHessian": (
        hesse.optim.AdaHessian,
        ["lr", "betas", "eps", "weight_decay", "hessian_power", "update_each", "seed"],
    ),
    "Sophia": (hesse.optim.Sophia, ["lr", "betas", "rho", "weight_decay", "update_each", "seed"]),
}
_OPTIM_CASES = [(c, a) for c, (_, args) in _OPTIMIZERS.items() for a in args]


@pytest.mark.parametrize(("cls", "arg"), _OPTIM_CASES, ids=[f"{c}-{a}" for c, a in _OPTIM_CASES])
@SETTINGS
@given(value=BAD)
def test_optimizer_arguments(cls, arg, value):
    model, loss_fn, (x, y) = _problem()
    make = _OPTIMIZERS[cls][0]
    before = _snapshot(model, x, y)
    try:
        opt = make(model.parameters(), **{arg: value})
    except (ValueError, TypeError) as err:
        assert arg in str(err), f"{type(err).__name__} does not name {arg}: {err}"
        assert _unchanged(before, model, x, y)
        return

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # accepted at construction: a step must work


# -- compare --------------------------------------------------------------------------
def _not_a_long_budget(value) -> bool:
    """A huge but valid number of epochs would train for hours: not a malformed value."""
    return not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 50)


@pytest.mark.parametrize("arg", ["epochs", "batch_size", "evals_per_epoch", "seed", "data"])
@SETTINGS
@given(value=BAD.filter(_not_a_long_budget))
def test_compare_arguments(arg, value):
    _, loss_fn, (x, y) = _problem()
    kwargs = {
        "data": (x, y),
        "optimizers": {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1)},
        "epochs": 1,
        "batch_size": 6,
        arg: value,
    }
    _check(lambda: hesse.optim.compare(lambda: _problem()[0], loss_fn, **kwargs), (arg,), x, y)


# -- the CLI --------------------------------------------------------------------------
_NOT_A_SEED = ["-1", "abc", "1.7", "99999999999999999999999", "nan", "", "2e3"]
_NOT_A_COUNT = ["-1", "0", "abc", "1.5", "nan", "inf", "", "99999999999999999999999"]
# (a count far beyond the data is refused too: torch's sizes stop at 2**63)
_NOT_POSITIVE = ["-1", "0", "nan", "inf", "-inf", "abc", "", "1e999"]
_CLI_CASES = [
    (["spectrum", "linear-diabetes", "--seed"], _NOT_A_SEED),
    (["spectrum", "linear-diabetes", "--matvecs"], _NOT_A_COUNT),
    (["spectrum", "linear-diabetes", "--max-iter"], _NOT_A_COUNT),
    (["spectrum", "linear-diabetes", "--probes"], _NOT_A_COUNT),
    (["spectrum", "linear-diabetes", "-k"], _NOT_A_COUNT),
    (["spectrum", "linear-diabetes", "--tol"], _NOT_POSITIVE),
    (["convexity", "linear-diabetes", "--tol"], _NOT_POSITIVE),
    (["compare", "linear-diabetes", "--epochs"], _NOT_POSITIVE),
    (["compare", "linear-diabetes", "--lr"], _NOT_POSITIVE),
    (["compare", "linear-diabetes", "--time-budget"], _NOT_POSITIVE),
    (["compare", "linear-diabetes", "--batch-size"], _NOT_A_COUNT),
    (["compare", "linear-diabetes", "--max-iter"], _NOT_A_COUNT),
]


@pytest.mark.parametrize(
    ("argv", "values"), _CLI_CASES, ids=[" ".join(a[::2]) for a, _ in _CLI_CASES]
)
@SETTINGS
@given(data=st.data())
def test_cli_bad_option_values_are_usage_errors(argv, values, data, capsys):
    """Exit status 2 and one line on stderr that names the option; no traceback, nothing
    on stdout."""
    value = data.draw(st.sampled_from(values))
    code = main([*argv, value, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, (value, code, err)
    assert err.startswith("hesse: error: ") and err.count("\n") == 1, err
    assert f"argument {argv[-1]}" in err or f"{argv[-1]} " in err, err
    assert out == ""
