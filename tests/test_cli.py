"""The hesse command: exit codes, files, the JSON and its numbers against the library's own
answers for the same problem, the user errors, and the README's commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hesse
from hesse.analysis import parameter_blocks
from hesse.cli import main
from hesse.problems import FUNCTIONS, PROBLEMS, problem

ROOT = Path(__file__).resolve().parents[1]
USER_FILE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
loss_fn = nn.MSELoss()
X = torch.randn(50, 4)
data = (X, X[:, :1] ** 2)
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """The command in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # stdout holds the JSON and nothing else


def fixed_model(name: str, seed: int = 0):
    p = problem(name)
    torch.manual_seed(seed)
    return p, p.make_model()


def optimum(name: str):
    """What ``--at optimum`` finds: hesse.minimize('newton-cg') from the problem's start."""
    p, model = fixed_model(name)
    fun, w0 = p.objective(model)
    return fun, hesse.minimize(fun, w0, "newton-cg").x


# ------------------------------------------------------------------ the command itself


@pytest.mark.parametrize(
    "command", [None, "demo", "problems", "compare", "spectrum", "convexity", "prune"]
)
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0 and out.startswith("usage: hesse")
    assert command is None or "--json" in out


def test_python_dash_m_and_the_console_script():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "hesse", "problems", "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [p["name"] for p in json.loads(out.stdout)["problems"]] == list(PROBLEMS)
    assert out.stderr == ""
    script = Path(sys.executable).parent / "hesse"
    if script.exists():  # installed by `pip install -e .`
        version = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert version.returncode == 0 and version.stdout.strip() == f"hesse {hesse.__version__}"


def test_problems_lists_sizes(capsys):
    res = run_json(capsys, "problems")
    for d in res["problems"]:
        p = problem(d["name"])
        assert d["parameters"] == p.num_parameters
        assert d["train_samples"] == p.train[0].shape[0]
    assert [f["name"] for f in res["functions"]] == list(FUNCTIONS)
    code, out, _ = run(capsys, "problems")
    assert code == 0 and "mlp-digits" in out and "rosenbrock" in out


# ---------------------------------------------------------------- numbers vs library


def test_spectrum_of_a_convex_problem_matches_the_library(capsys, tmp_path):
    res = run_json(capsys, "spectrum", "logistic-breast-cancer", "-k", "3", "--which", "both",
                   "--out", tmp_path)  # fmt: skip
    assert res["point"] == "optimum" and res["parameters"] == 31
    fun, w = optimum("logistic-breast-cancer")
    H = hesse.FunctionHessian(fun, w)
    ref = hesse.eigenvalues(H, k=3, which="both", seed=0)
    torch.testing.assert_close(torch.tensor(res["eigenvalues"]["values"], dtype=torch.float64),
                               ref.eigenvalues, rtol=1e-10, atol=0)  # fmt: skip
    dense = torch.linalg.eigvalsh(hesse.hessian(fun, w))
    got = torch.tensor(res["eigenvalues"]["values"], dtype=torch.float64)
    torch.testing.assert_close(got, torch.cat([dense[:3], dense.flip(0)[:3]]), rtol=1e-8, atol=0)
    tr = hesse.trace(H, method="xtrace", num_matvecs=100, seed=0)
    assert res["trace"]["estimate"] == pytest.approx(tr.estimate, rel=1e-10)
    assert res["trace"]["estimate"] == pytest.approx(float(dense.sum()), rel=1e-8)
    assert res["density"]["negative_eigenvalue_share"] == 0.0  # positive definite
    assert res["density"]["negative_curvature_share"] == 0.0
    assert {p.name for p in tmp_path.iterdir()} == {"spectrum.json", "density.png", "density.json"}
    assert json.loads((tmp_path / "spectrum.json").read_text())["eigenvalues"] == res["eigenvalues"]


def test_spectrum_of_a_network_at_init_matches_the_library(capsys):
    res = run_json(capsys, "spectrum", "mlp-digits", "-k", "2", "--no-density",
                   "--matvecs", "10", "--seed", "3")  # fmt: skip
    assert res["point"] == "init" and "density" not in res
    p, model = fixed_model("mlp-digits", seed=3)
    H = hesse.HessianOperator(model, p.loss_fn, p.train)
    ref = hesse.eigenvalues(H, k=2, seed=3)
    got = torch.tensor(res["eigenvalues"]["values"])
    torch.testing.assert_close(got, ref.eigenvalues, rtol=1e-4, atol=1e-6)
    assert res["trace"]["matvecs"] == hesse.trace(H, num_matvecs=10, seed=3).matvecs


def test_convexity_of_a_convex_problem(capsys):
    res = run_json(capsys, "convexity", "logistic-breast-cancer", "--probes", "2",
                   "--steps", "10")  # fmt: skip
    fun, w = optimum("logistic-breast-cancer")
    ref = hesse.convexity(fun, w, seed=0)
    assert res["verdict"] == "positive_definite" == ref.verdict
    assert res["certified"] and res["exact"]
    assert res["min_eigenvalue"] == pytest.approx(ref.min_eigenvalue, rel=1e-10)
    assert res["gradient_norm"] == pytest.approx(ref.gradient_norm, rel=1e-6, abs=1e-12)
    assert res["negative_eigenvalue_share"] == res["negative_curvature_share"] == 0.0


def test_convexity_of_a_network_per_layer(capsys):
    res = run_json(capsys, "convexity", "mlp-digits", "--per-layer", "--probes", "2",
                   "--steps", "20")  # fmt: skip
    _, model = fixed_model("mlp-digits")
    assert res["verdict"] == "indefinite" and res["certified"]
    assert res["min_eigenvalue"] < 0 < res["max_eigenvalue"]
    assert 0 < res["negative_eigenvalue_share"] < 1 and 0 < res["negative_curvature_share"] < 1
    assert [r["name"] for r in res["layers"]] == list(parameter_blocks(model))
    assert sum(r["size"] for r in res["layers"]) == res["parameters"] == 4810


def test_a_users_file(capsys, tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    res = run_json(capsys, "spectrum", path, "-k", "2", "--no-density", "--per-layer")
    assert res["kind"] == "file" and res["point"] == "given" and res["parameters"] == 49
    ns: dict = {}
    exec(USER_FILE, ns)  # the same model: the file seeds itself
    H = hesse.HessianOperator(ns["model"], ns["loss_fn"], ns["data"])
    dense = torch.linalg.eigvalsh(H.to_dense().double())
    torch.testing.assert_close(torch.tensor(res["eigenvalues"]["values"], dtype=torch.float64),
                               dense.flip(0)[:2], rtol=1e-4, atol=1e-6)  # fmt: skip
    assert [r["name"] for r in res["layers"]] == ["0", "2"]
    conv = run_json(capsys, "convexity", path, "--no-density", "--dtype", "float64")
    assert conv["dtype"] == "float64" and conv["exact"]
    X, y = ns["data"]
    H64 = hesse.HessianOperator(ns["model"].double(), ns["loss_fn"], (X.double(), y.double()))
    ref = hesse.convexity(H64)
    assert conv["verdict"] == ref.verdict
    assert conv["min_eigenvalue"] == pytest.approx(ref.min_eigenvalue, rel=1e-10, abs=1e-14)


def test_compare_minimise_matches_hesse_minimize(capsys, tmp_path):
    res = run_json(capsys, "compare", "logistic-breast-cancer", "--methods", "newton-cg,l-bfgs",
                   "--out", tmp_path)  # fmt: skip
    assert res["mode"] == "minimize" and list(res["methods"]) == ["newton-cg", "l-bfgs"]
    p, model = fixed_model("logistic-breast-cancer")
    fun, w0 = p.objective(model)
    for m, d in res["methods"].items():
        # a convex problem: the CLI asks no method for a saddle check
        opts = {"saddle_check": False}
        r = hesse.minimize(fun, w0, m, tol=1e-8, max_iter=2000, options=opts)
        assert (d["nit"], d["nfev"], d["njev"], d["nhvp"], d["nhev"]) == (
            r.nit, r.nfev, r.njev, r.nhvp, r.nhev)  # fmt: skip
        assert d["fun"] == pytest.approx(float(r.fun), rel=1e-12)
        assert d["status"] == r.status
    assert res["f_star"] == min(d["fun"] for d in res["methods"].values())
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"compare.json", "convergence.png", "convergence.json"}


def test_compare_a_classic_function_uses_its_known_minimum(capsys):
    res = run_json(capsys, "compare", "rosenbrock", "--methods", "newton,bfgs")
    assert res["f_star_source"] == "known" and res["f_star"] == 0.0
    assert all(d["success"] for d in res["methods"].values())


def test_compare_training_matches_hesse_optim_compare(capsys, tmp_path):
    res = run_json(capsys, "compare", "mlp-digits", "--methods", "adam,sgd", "--epochs", "2",
                   "--out", tmp_path)  # fmt: skip
    assert res["mode"] == "train" and res["metric"] == "accuracy"
    p = problem("mlp-digits")
    curves = hesse.optim.compare(
        p.make_model, p.loss_fn, p.train,
        {"adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
         "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1)},
        epochs=2, test_data=p.test, metric=p.metric, seed=0,
    )  # fmt: skip
    for m, c in curves.items():
        d = res["methods"][m]
        assert d["steps"] == c.steps[-1] == 2
        assert d["loss"] == pytest.approx(c.loss[-1], rel=1e-5)
        assert d["test_metric"] == pytest.approx(c.test[-1])
    assert {p.name for p in tmp_path.iterdir()} == {"compare.json", "training.png", "training.json"}


# ------------------------------------------------------------------------ user errors

USER_ERRORS = [
    (["spectrum", "missing.py"], "no such file: missing.py"),
    (["spectrum", "{empty}"], "does not define model, loss_fn and data"),
    (["convexity", "{no_model}"], "does not define model"),
    (["spectrum", "no-such-problem"], "neither a built-in problem nor a file"),
    (["compare", "logistic-digits", "--methods", "newton,fast"], "unknown method 'fast'"),
    (["compare", "rosenbrock", "--methods", "adam"], "rosenbrock is a function of one vector"),
    (["compare", "mlp-digits", "--methods", "bfgs"], "cannot train"),
    (["compare", "logistic-breast-cancer", "--epochs", "3"], "--epochs applies to training"),
    (["compare", "mlp-digits", "--tol", "1e-3"], "--tol applies to minimising"),
    (["spectrum", "logistic-digits", "--per-layer"], "more than one layer"),
    (["spectrum", "rosenbrock", "--per-layer"], "is a function of one vector"),
    (["convexity", "mlp-digits", "--at", "optimum"], "needs a convex problem"),
    (["spectrum", "{user}", "--at", "init"], "--at applies to the built-in problems"),
    (["spectrum", "mlp-digits", "-k", "0"], "argument -k: expected an integer in [1, "),
    (["convexity", "mlp-digits", "-k", "3"], "unrecognized arguments: -k 3"),
    (["spectrum"], "the following arguments are required: TARGET"),
    (["spectrum", "mlp-digits", "--dtype", "float16"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "no_model.py").write_text("loss_fn = print\ndata = (1, 2)\n")
    (tmp_path / "user.py").write_text(USER_FILE)
    return {k: str(tmp_path / f"{k}.py") for k in ("empty", "no_model", "user")}


@pytest.mark.parametrize(("argv", "message"), USER_ERRORS)
def test_user_errors_are_one_sentence_and_status_2(capsys, files, argv, message):
    code, out, err = run(capsys, *(a.format(**files) for a in argv))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hesse: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_no_cuda_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "spectrum", "rosenbrock", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_a_failing_file_is_status_1_and_debug_shows_the_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("model = 1 / 0\n")
    code, _, err = run(capsys, "spectrum", bad)
    assert code == 1 and "ZeroDivisionError" in err and "--debug" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "spectrum", bad, "--debug")
    assert code == 1 and "Traceback" in err


def test_a_missing_extra_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # as if rich were not installed
    code, out, err = run(capsys, "problems")
    assert code == 1 and out == ""
    assert err.strip() == "hesse: error: the hesse command needs rich: pip install 'hesse[cli]'"


# ------------------------------------------------------------------- the demo, README

FIGURES = {
    "logistic_convergence",
    "logistic_eigenvalues",
    "mlp_training",
    "mlp_density",
    "mlp_top_eigenvalues",
}


def makefile_demo_command() -> list[str]:
    """The command of `make demo`, without the path of the virtual environment."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:")[1].splitlines()[1].strip()
    return shlex.split(recipe.replace("$(VENV)/bin/", ""))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo`'s command on the quick budget, run once for the tests below."""
    out = tmp_path_factory.mktemp("demo")
    argv = makefile_demo_command()
    assert argv == ["hesse", "demo"]
    code = main([*argv[1:], "--budget", "quick", "--out", str(out), "--json"])
    assert code == 0
    return out


@pytest.mark.slow
def test_demo_writes_its_files(demo):
    names = {p.name for p in demo.iterdir()}
    assert names == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "json")} | {
        "results.json", "report.md"}  # fmt: skip
    report = (demo / "report.md").read_text()
    for f in FIGURES:
        assert f"({f}.png)" in report
        assert (demo / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((demo / "results.json").read_text())
    assert set(res["figures"]) == {f"{f}.png" for f in FIGURES}
    assert set(res) >= {"logistic", "mlp", "time_s", "budget", "seed", "hesse_version"}


@pytest.mark.slow
def test_demo_numbers_match_the_library(demo):
    res = json.loads((demo / "results.json").read_text())
    lo = res["logistic"]
    p, model = fixed_model("logistic-breast-cancer")
    fun, w0 = p.objective(model)
    assert list(lo["methods"]) == ["newton", "newton-cg", "bfgs", "l-bfgs", "gd", "nag"]
    for m, d in lo["methods"].items():
        r = hesse.minimize(fun, w0, m, tol=1e-8, max_iter=60)
        assert (d["nit"], d["nfev"], d["njev"], d["nhvp"]) == (r.nit, r.nfev, r.njev, r.nhvp)
        if m == lo["optimum"]["method"]:  # where the demo looked at the Hessian
            exact = torch.linalg.eigvalsh(hesse.hessian(fun, r.x))
    h = lo["hessian"]
    assert h["verdict"] == "positive_definite" and h["certified"]
    torch.testing.assert_close(torch.tensor(h["eigenvalues"], dtype=torch.float64), exact.flip(0),
                               rtol=1e-8, atol=0)  # fmt: skip
    assert h["condition_number"] == pytest.approx(float(exact[-1] / exact[0]), rel=1e-3)
    mlp = res["mlp"]
    assert set(mlp["hessian"]) == {"init", "hessian-free", "adam"}
    p, model = fixed_model("mlp-digits")
    ref = hesse.eigenvalues(hesse.HessianOperator(model, p.loss_fn, p.train), k=3, seed=0)
    torch.testing.assert_close(torch.tensor(mlp["hessian"]["init"]["top_eigenvalues"]),
                               ref.eigenvalues, rtol=1e-4, atol=1e-6)  # fmt: skip
    init = mlp["hessian"]["init"]
    assert init["verdict"] == "indefinite" and 0 < init["negative_curvature_share"] < 1
    for a in mlp["hessian"].values():
        assert 0 <= a["negative_eigenvalue_share"] < 1 and 0 <= a["negative_curvature_share"] < 1
    for d in mlp["training"]["methods"].values():
        assert d["steps"] >= 1 and d["curve"]["loss"][-1] < d["curve"]["loss"][0]


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## The hesse command")[1].split("\n## ")[0]


@pytest.mark.slow
def test_readme_commands_run(capsys, tmp_path, monkeypatch, demo):
    section = readme_section()
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    user_file = next(b for lang, b in blocks if lang == "python")
    assert len(user_file.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    name = re.search(r"# (\w+\.py)", user_file).group(1)
    (tmp_path / name).write_text(user_file)
    commands = [
        line.split("#")[0].strip()
        for lang, b in blocks
        if lang == "bash"
        for line in b.splitlines()
        if line.startswith("hesse ")
    ]
    assert commands[0] == shlex.join(makefile_demo_command())  # `make demo` is the first
    for command in commands[1:]:  # the demo ran in the fixture, on the quick budget
        code, out, err = run(capsys, *shlex.split(command)[1:])
        assert code == 0, f"{command}: {err}"
        if "--json" in command:
            json.loads(out)
    assert (tmp_path / "spectrum" / "spectrum.json").exists()
