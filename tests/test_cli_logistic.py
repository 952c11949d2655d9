"""``hesse problems`` / ``hesse compare`` on the tall synthetic logistic problems
(``logistic-tall``, ``logistic-correlated``): every method of hesse.minimize, the
subsampled Newton included, and the gradient norm against time."""

from __future__ import annotations

import json

import pytest
import torch

import hesse
from hesse._minimize import FINITE_SUM_METHODS, METHODS
from hesse.cli import main
from hesse.problems import SCALABLE, problem, synthetic_logistic


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_the_logistic_problems_are_seeded_synthetic_logistic():
    for name, features in (("logistic-tall", "independent"), ("logistic-correlated", "correlated")):
        p = problem(name, samples=300)
        ref = synthetic_logistic(300, 100, features=features, seed=0)
        assert p.name == name and p.convex and p.num_parameters == 101
        assert torch.equal(p.train[0], ref.train[0]) and torch.equal(p.train[1], ref.train[1])
        assert p.l2 == ref.l2 == 1 / 300
        assert problem(name).train[0].shape == (SCALABLE[name], 100)
    with pytest.raises(ValueError, match="samples applies to the synthetic problems"):
        problem("linear-diabetes", samples=100)
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        problem("logistic-tall", samples=0)


def test_problems_lists_the_logistic_problems(capsys):
    res = run_json(capsys, "problems")
    rows = {d["name"]: d for d in res["problems"]}
    for name, n in SCALABLE.items():
        assert rows[name]["train_samples"] == n and rows[name]["parameters"] == 101
        assert rows[name]["convex"]


def test_compare_runs_the_subsampled_newton_and_plots_the_gradient_norm(capsys, tmp_path):
    methods = "newton-cg,l-bfgs,subsampled-newton"
    res = run_json(capsys, "compare", "logistic-correlated", "--samples", 1500, "--methods",
                   methods, "--out", tmp_path)  # fmt: skip
    assert res["mode"] == "minimize" and list(res["methods"]) == methods.split(",")
    p = problem("logistic-correlated", samples=1500)
    torch.manual_seed(0)
    fun, w0 = p.objective(p.make_model())
    for m, d in res["methods"].items():  # what hesse.minimize gives on the same FiniteSum
        # a convex problem: the CLI asks no method for a saddle check
        opts = {"saddle_check": False}
        r = hesse.minimize(fun, w0, m, tol=1e-8, max_iter=2000, options=opts)
        assert (d["nit"], d["nfev"], d["nhev"], d["status"]) == (r.nit, r.nfev, r.nhev, r.status)
        assert d["fun"] == pytest.approx(float(r.fun), rel=1e-12)
    ssn = res["methods"]["subsampled-newton"]
    assert ssn["success"] and ssn["nhev"] >= ssn["nit"] and ssn["grad_norm"] <= 1e-7
    assert ssn["fun"] - res["f_star"] <= 1e-12
    assert {f.name for f in tmp_path.iterdir()} == {
        "compare.json",
        "convergence.png",
        "convergence.json",
    }
    fig = json.loads((tmp_path / "convergence.json").read_text())
    curve = fig["methods"]["subsampled-newton"]
    assert curve["grad_norm"] == ssn["history"]["grad_norm"]
    assert len(curve["time_s"]) == len(curve["grad_norm"]) == ssn["nit"] + 1
    assert curve["grad_norm"][-1] < 1e-6 * curve["grad_norm"][0]


def test_every_method_is_the_default_on_the_logistic_problems(capsys):
    """Without --methods, every method of hesse.minimize runs, each within the time limit
    (a first-order method that needs thousands of iterations stops there)."""
    res = run_json(capsys, "compare", "logistic-tall", "--samples", 400, "--time-limit", 0.5)
    assert list(res["methods"]) == [*METHODS, *FINITE_SUM_METHODS]
    for m, d in res["methods"].items():
        assert d["status"] in ("converged", "ftol", "time_limit", "max_iterations"), m
        assert d["time_s"] < 5.0, m
    assert res["methods"]["subsampled-newton"]["status"] == "converged"


def test_the_time_limit_stops_a_slow_method(capsys):
    res = run_json(capsys, "compare", "logistic-correlated", "--samples", 500, "--methods", "gd",
                   "--time-limit", 0.2)  # fmt: skip
    d = res["methods"]["gd"]
    assert d["status"] == "time_limit" and not d["success"] and d["time_s"] < 2.0


def test_the_time_limit_is_a_status_of_the_one_vocabulary():
    # the run stopped at the clock is an OptimizeResult built with Status.TIME_LIMIT (not a
    # string set afterwards), whose message and advice come from its template
    import argparse

    from hesse.cli._common import Output
    from hesse.cli._compare import minimize_all
    from hesse.linalg import NotConvergedError, Status

    ui = Output(argparse.Namespace(json=True, out=None))
    f = hesse.problems.classic_function("rosenbrock")
    runs = minimize_all(f.fun, f.x0(), ["gd"], None, None, ui, time_limit=0.0)
    r, _ = runs["gd"]
    assert r.status is Status.TIME_LIMIT and not r.success
    assert r.message == "stopped after the time limit of 0 s; raise --time-limit"
    assert r.advice == Status.TIME_LIMIT.advice()  # "raise the time limit"
    with pytest.raises(NotConvergedError, match="status 'time_limit'"):
        r.raise_for_status()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "linear-diabetes", "--samples", "100"], "--samples applies to the synth"),
        (["compare", "rosenbrock", "--methods", "subsampled-newton"], "subsamples data"),
        (
            ["compare", "logistic-tall", "--samples", "0"],
            "--n: expected an integer in [1",
        ),
        (["compare", "mlp-digits", "--time-limit", "1"], "--time-limit applies to minimising"),
    ],
)
def test_user_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and message in err, err
