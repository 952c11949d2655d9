"""The benchmarks' shared harness and solver runners (``benchmarks/_harness.py``,
``benchmarks/_solvers.py``): what every benchmark's figures rest on, checked in seconds."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness
import _solvers


def test_time_calls_interleaves_rounds_after_warmup():
    calls = {"a": 0, "b": 0}

    def counting(key):
        def call():
            calls[key] += 1

        return call

    times = _harness.time_calls({k: counting(k) for k in calls}, rounds=4, warmup=2)
    assert {k: len(t) for k, t in times.items()} == {"a": 4, "b": 4}
    assert calls == {"a": 6, "b": 6}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_rotations_put_each_key_first_once():
    firsts = [order[0] for _, order in _harness.rotations(["x", "y", "z"], 3)]
    assert firsts == ["x", "y", "z"]
    assert all(sorted(o) == ["x", "y", "z"] for _, o in _harness.rotations(["x", "y", "z"], 5))


def test_time_limit_stops_a_long_run():
    with pytest.raises(_solvers.RunTimeout), _solvers.time_limit(0.05):
        time.sleep(1.0)


def test_write_json_is_standard_json_with_the_header(tmp_path):
    meta = _harness.finish(_harness.machine("cpu", peers=("no-such-distribution",)), 0.0)
    for key in ("date", "git", "torch", "hesse", "threads", "OPENBLAS_NUM_THREADS"):
        assert key in meta
    assert meta["peers"] == {"no-such-distribution": None}
    path = _harness.write_json(tmp_path / "r.json", {"meta": meta, "x": [math.inf, math.nan]})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data["x"] == ["inf", "nan"]
    assert _harness.result_path("name", None) == _harness.RESULTS / "name.json"


def test_print_table_aligns_and_dashes_missing_numbers(capsys):
    _harness.print_table("T", [("name", "<6"), ("value", "7.2f")], [["a", 1.5], ["bb", None]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["name     value", "-" * 14, "a         1.50", "bb           -"]


def logistic(n=200, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X[:, 0])).double()

    def fun(w):
        z = X @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5e-2 * (w @ w)

    return X, y, fun


def gradient_norm(fun, w):
    w = w.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fun(w), w)
    return float(g.norm())


@pytest.mark.parametrize("runner", ["scipy", "torch"])
def test_a_watch_ends_a_run_at_the_first_point_meeting_the_target(runner):
    _, _, fun = logistic()
    x0 = torch.zeros(4, dtype=torch.float64)
    target = 1e-3 * gradient_norm(fun, x0)
    watch = _solvers.Watch(target)
    if runner == "scipy":
        obj = _solvers.ScipyObjective(fun, watch=watch)
        x, info = _solvers.scipy_minimize(obj, x0, "L-BFGS-B", {"gtol": 0.0, "ftol": 0.0})
    else:
        x, info = _solvers.torch_lbfgs(fun, x0, 10, 0.0, max_iter=1000, max_eval=1000, watch=watch)
    assert gradient_norm(fun, x) <= target
    assert info["nfev"] == watch.nfev > 1


def test_runners_agree_on_the_minimiser():
    X, y, fun = logistic()
    x0 = torch.zeros(4, dtype=torch.float64)
    obj = _solvers.ScipyObjective(fun)
    xs = {
        "hesse": _solvers.hesse_minimize(fun, x0, "newton-cg", 1e-10)[0],
        "scipy": _solvers.scipy_minimize(obj, x0, "BFGS", {"gtol": 1e-10})[0],
        "torch": _solvers.torch_lbfgs(fun, x0, 10, 1e-12, max_iter=500, max_eval=600)[0],
    }
    # scikit-learn's C is 1 / (n * lambda) for the mean loss + lambda/2 |w|^2
    w, info = _solvers.sklearn_logistic(
        X.numpy(), y.numpy(), "lbfgs", C=1 / (200 * 1e-2), tol=1e-10, fit_intercept=False,
        max_iter=1000,
    )  # fmt: skip
    xs["sklearn"] = w
    assert info["nit"] > 0
    for name, x in xs.items():
        np.testing.assert_allclose(x.numpy(), xs["hesse"].numpy(), atol=1e-6, err_msg=name)
    w1, _ = _solvers.sklearn_logistic(X.numpy(), y.numpy(), "lbfgs", 1.0, 1e-6, True, 100)
    assert w1.shape == (5,)  # the intercept last


def test_guarded_run_reports_failures_and_time_limits():
    def fails():
        raise ValueError("no")

    def slow():
        time.sleep(1.0)
        return torch.zeros(1), {}

    x, rec = _solvers.guarded_run(fails, 5.0)
    assert x is None and rec["ok"] is False and rec["error"] == "ValueError: no"
    x, rec = _solvers.guarded_run(slow, 0.05)
    assert x is None and "limit" in rec["error"]
    x, rec = _solvers.guarded_run(lambda: (torch.ones(1), {"nit": 3}), 5.0)
    assert x is not None and rec["nit"] == 3 and rec["seconds"] >= 0
