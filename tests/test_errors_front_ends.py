"""Front ends refuse bad input with one clear ValueError/TypeError (or a usage error of the
CLI, exit status 2) that names the argument: never a raw error from torch or Python."""

import pytest
import torch

import hesse
from hesse.cli import main


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _problem(n_in=3):
    torch.manual_seed(0)
    return torch.nn.Linear(n_in, 1), torch.randn(8, n_in), torch.randn(8, 1)


# -- optimizers: hyper-parameters set by a scheduler -----------------------------------
_STRICT = {
    "NewtonCG": lambda p: hesse.optim.NewtonCG(p),
    "HessianFree": lambda p: hesse.optim.HessianFree(p),
    "LBFGS": lambda p: hesse.optim.LBFGS(p),
}
_ADAPTIVE = {
    "AdaHessian": lambda p: hesse.optim.AdaHessian(p),
    "Sophia": lambda p: hesse.optim.Sophia(p),
}
# lr = 0 is refused where lr is a line search's first step; AdaHessian and Sophia take it
# as torch.optim's Adam does (no move, see the test below)
_BAD_LR = [(n, lr) for n in _STRICT for lr in (0.0, -1.0, float("nan"))] + [
    (n, lr) for n in _ADAPTIVE for lr in (-1.0, float("nan"))
]


@pytest.mark.parametrize(("name", "lr"), _BAD_LR)
def test_lr_set_to_a_bad_value_after_construction_is_refused_at_step(name, lr):
    model, x, y = _problem()
    opt = {**_STRICT, **_ADAPTIVE}[name](model.parameters())
    opt.param_groups[0]["lr"] = lr
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(_closure(opt, model, x, y))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", [hesse.optim.AdaHessian, hesse.optim.Sophia])
def test_lr_zero_at_the_end_of_a_schedule_means_no_move(cls):
    """As torch.optim's Adam: a schedule that ends at lr = 0 (cosine annealing) is legal,
    and the parameters stay where they are."""
    model, x, y = _problem()
    opt = cls(model.parameters(), weight_decay=0.1)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_other_hyper_parameters_are_checked_at_step():
    model, x, y = _problem()
    opt = hesse.optim.LBFGS(model.parameters())
    opt.param_groups[0]["max_iter"] = 0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['max_iter'\]"):
        opt.step(_closure(opt, model, x, y))
    opt = hesse.optim.AdaHessian(model.parameters())
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\]"):
        opt.step(_closure(opt, model, x, y))


# -- optimizers: load_state_dict -------------------------------------------------------
def _trained(cls, n_in=3):
    model, x, y = _problem(n_in)
    opt = cls(model.parameters())
    opt.step(_closure(opt, model, x, y))
    return opt


@pytest.mark.parametrize(
    "saved, loader",
    [
        (hesse.optim.LBFGS, hesse.optim.NewtonCG),
        (hesse.optim.NewtonCG, hesse.optim.LBFGS),
        (hesse.optim.AdaHessian, hesse.optim.Sophia),
        (hesse.optim.Sophia, hesse.optim.AdaHessian),
    ],
)
def test_state_of_another_optimizer_class_is_refused_at_load(saved, loader):
    state = _trained(saved).state_dict()
    model, x, y = _problem()
    opt = loader(model.parameters())
    with pytest.raises(ValueError, match="another optimizer class"):
        opt.load_state_dict(state)
    opt.step(_closure(opt, model, x, y))  # the previous (empty) state was kept


@pytest.mark.parametrize(
    "cls", [hesse.optim.LBFGS, hesse.optim.NewtonCG, hesse.optim.AdaHessian, hesse.optim.Sophia]
)
def test_state_of_another_model_size_is_refused_at_load(cls):
    state = _trained(cls, n_in=3).state_dict()
    model, _, _ = _problem(n_in=4)
    opt = cls(model.parameters())
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(state)


def test_state_of_the_same_class_and_size_still_loads():
    saved = _trained(hesse.optim.LBFGS)
    model, x, y = _problem()
    opt = hesse.optim.LBFGS(model.parameters())
    opt.load_state_dict(saved.state_dict())
    opt.step(_closure(opt, model, x, y))


# -- hvp of a constant -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_hvp_of_a_constant_is_zero_like_hessian(mode):
    x, v = torch.ones(3), torch.randn(3)

    def f(z):
        return torch.tensor(2.0)

    assert torch.equal(hesse.hvp(f, x, v, mode=mode), torch.zeros(3))
    assert torch.equal(hesse.hessian(f, x), torch.zeros(3, 3))
    assert torch.equal(hesse.linearize_hvp(f, x)(v), torch.zeros(3))


# -- minimize --------------------------------------------------------------------------
def test_minimize_refuses_an_empty_start():
    with pytest.raises(ValueError, match="x0"):
        hesse.minimize(lambda z: (z**2).sum(), torch.zeros(0))


# -- compare ---------------------------------------------------------------------------
SGD = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1)}


def _compare(**kw):
    _, x, y = _problem()
    args = {"make_model": lambda: torch.nn.Linear(3, 1), "data": (x, y), "epochs": 1}
    args.update(kw)
    return hesse.optim.compare(
        args.pop("make_model"), torch.nn.functional.mse_loss, args.pop("data"), SGD, **args
    )


@pytest.mark.parametrize("epochs", [float("nan"), float("inf"), 0, -1.0])
def test_compare_refuses_a_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        _compare(epochs=epochs)


def test_compare_refuses_a_list_of_batches():
    _, x, y = _problem()
    with pytest.raises(TypeError, match=r"data must be one batch \(inputs, targets\)"):
        _compare(data=[(x, y), (x, y)])


def test_compare_refuses_a_model_factory_returning_none():
    with pytest.raises(TypeError, match="make_model"):
        _compare(make_model=lambda: None)


# -- CLI -------------------------------------------------------------------------------
def test_cli_compare_infinite_epochs_is_a_usage_error(capsys):
    code = main(["compare", "logistic-breast-cancer", "--methods", "l-bfgs", "--train",
                 "--epochs", "inf"])  # fmt: skip
    assert code == 2
    assert "--epochs" in capsys.readouterr().err


def test_cli_spectrum_xtrace_with_one_matvec_is_a_usage_error(capsys):
    code = main(["spectrum", "logistic-breast-cancer", "--estimator", "xtrace", "--matvecs", "1"])
    assert code == 2
    assert "--matvecs" in capsys.readouterr().err


# -- the CLI: files and stdout --------------------------------------------------------
_USER_FILE = """
import torch
print("hello from the user's file")
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
loss_fn = torch.nn.MSELoss()
data = (torch.randn(10, 3), torch.randn(10, 2))
"""


def test_cli_json_stdout_is_json_even_when_the_user_file_prints(tmp_path, capsys):
    import json

    f = tmp_path / "model.py"
    f.write_text(_USER_FILE)
    assert main(["spectrum", str(f), "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # nothing but the document on stdout
    assert doc["command"] == "spectrum"
    assert "hello from the user's file" in err


def test_cli_unwritable_out_is_a_usage_error_before_any_work(tmp_path, capsys):
    f = tmp_path / "model.py"
    f.write_text(_USER_FILE)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["spectrum", str(f), "--out", str(blocker / "sub")]) == 2
    out, err = capsys.readouterr()
    assert f"--out {blocker / 'sub'}: cannot write files there" in err
    # refused before the user's file ran: it printed nothing
    assert "hello from the user's file" not in out + err


@pytest.mark.parametrize("name", [*_STRICT, *_ADAPTIVE])
def test_a_closure_that_never_calls_backward_is_refused(name):
    """Without backward() every gradient is None: read as zeros, the step would take the
    start for a stationary point and report nothing."""
    model, x, y = _problem()
    opt = {**_STRICT, **_ADAPTIVE}[name](model.parameters())

    def closure():
        opt.zero_grad()
        return torch.nn.functional.mse_loss(model(x), y)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"call loss.backward\(\) in the closure"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", [hesse.optim.AdaHessian, hesse.optim.Sophia])
def test_weight_decay_skips_a_parameter_without_gradient(cls):
    """As torch.optim's AdamW: a parameter the loss does not use is neither decayed nor
    moved, while the used ones are."""
    model, x, y = _problem()
    unused = torch.nn.Parameter(torch.ones(3))
    opt = cls([*model.parameters(), unused], weight_decay=0.1, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(closure)
    assert torch.equal(unused.detach(), torch.ones(3))
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert "exp_avg" not in opt.state[unused]


@pytest.mark.parametrize("name", ["NewtonCG", "HessianFree", "SubsampledNewton"])
def test_newton_methods_refuse_per_group_hyper_parameters(name):
    """One Newton step moves every parameter: a group's own lr would be ignored (a group
    with lr 1e-12 moved by 0.3), so it is refused; a group added with the defaults is
    taken."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    cls = getattr(hesse.optim, name)
    opt = cls([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-12}])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(b(a(x)), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in b.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] is 1e-12 but"):
        opt.step(closure)
    assert all(torch.equal(p0, p) for p0, p in zip(before, b.parameters()))
    opt = cls(a.parameters())
    opt.add_param_group({"params": b.parameters()})
    opt.step(closure)
    assert not all(torch.equal(p0, p) for p0, p in zip(before, b.parameters()))
