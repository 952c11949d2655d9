"""hesse.optim's settings, reducer and seeds: every setting of every optimizer lives in its
param_groups (a state_dict restores it, and an optimizer made with the defaults continues
bit for bit), the reducer (the one place data parallelism meets an optimizer) receives
the named calls the protocol promises, and derived seeds follow ``derive_seed``."""

from __future__ import annotations

import copy
import hashlib
import inspect

import pytest
import torch
from torch import nn

from hesse._core._checks import derive_seed
from hesse.optim import KFAC, LBFGS, AdaHessian, HessianFree, NewtonCG, Sophia, SubsampledNewton
from hesse.optim._base import LOCAL, Reducer
from hesse.solvers import rademacher_like

f64 = torch.float64
CE = nn.CrossEntropyLoss()
#: Constructor arguments that wire an optimizer to a model (not settings: attributes).
WIRING = {"self", "params", "model", "loss_fn", "io", "likelihood"}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(f64)


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=f64)
    teacher = torch.randn(5, 3, generator=g, dtype=f64)
    return X, (X @ teacher).argmax(1)


def _params(cls, model):
    return model if cls is KFAC else model.parameters()


# name -> (class, wiring given to every instance, settings unlike the defaults, step kwargs)
CASES = {
    "LBFGS": (
        LBFGS,
        {},
        dict(
            lr=0.5,
            max_iter=3,
            history_size=4,
            tolerance_grad=1e-9,
            tolerance_change=1e-11,
            line_search="armijo",
        ),
        {},
    ),
    "LBFGS-batch": (LBFGS, {}, dict(lr=0.1, history_size=3, batch_mode=True), {}),
    "NewtonCG": (NewtonCG, {}, dict(lr=0.5, damping=0.1, cg_max_iter=5, cg_rtol=0.1), {}),
    "HessianFree": (
        HessianFree,
        {"model": True, "loss_fn": CE},
        dict(
            lr=0.5,
            damping=0.3,
            curvature="hessian",
            subsample=0.5,
            cg_max_iter=7,
            cg_rtol=0.3,
            warm_start=0.5,
            preconditioner=None,
            l2=0.01,
            seed=3,
        ),
        {"batch": True},
    ),
    "HessianFree-probes": (
        HessianFree,
        {},
        dict(damping=0.5, seed=9, cg_max_iter=6),  # the preconditioner's probes: seeded
        {},
    ),
    "SubsampledNewton": (
        SubsampledNewton,
        {"model": True, "loss_fn": CE},
        dict(
            lr=0.8,
            damping=0.01,
            curvature="ggn",
            subsample=0.25,
            subsample_growth=1.0,
            subsample_max=0.75,
            solver="cg",
            dense_max=10,
            max_iter=2,
            tolerance_grad=1e-12,
            cg_max_iter=9,
            cg_rtol=0.2,
            l2=0.001,
            seed=5,
        ),
        {"batch": True},
    ),
    "AdaHessian": (
        AdaHessian,
        {},
        dict(
            lr=0.05,
            betas=(0.8, 0.99),
            eps=1e-3,
            weight_decay=0.01,
            hessian_power=0.5,
            update_each=2,
            n_samples=2,
            seed=4,
        ),
        {},
    ),
    "Sophia": (
        Sophia,
        {},
        dict(
            lr=0.02,
            betas=(0.9, 0.95),
            rho=0.1,
            weight_decay=0.01,
            eps=1e-12,
            update_each=2,
            estimator="gnb",
            seed=6,
        ),
        {"outputs_fn": True},
    ),
    "KFAC": (
        KFAC,
        {"loss_fn": CE},
        dict(
            lr=0.05,
            damping=0.01,
            momentum=0.5,
            weight_decay=0.01,
            factor_decay=0.9,
            update_each=2,
            inverse_each=3,
            damping_method="pi",
            weight_sharing="reduce",
            fisher="mc",
            mc_samples=2,
            seed=7,
            kl_clip=0.01,
        ),
        {"batch": True},
    ),
}


def _make(case: str, model, settings: dict | None = None):
    cls, wiring, changed, _ = CASES[case]
    wiring = {k: (model if v is True else v) for k, v in wiring.items()}
    return cls(_params(cls, model), **wiring, **(changed if settings is None else settings))


def _run(case: str, model, opt, steps: int, X, y):
    step_kw = CASES[case][3]
    kw = {}
    if "batch" in step_kw:
        kw["batch"] = (X, y)
    if "outputs_fn" in step_kw:
        kw["outputs_fn"] = lambda: model(X)

    def closure():
        opt.zero_grad()
        loss = CE(model(X), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure, **kw)) for _ in range(steps)]
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("case", list(CASES))
def test_every_constructor_setting_is_in_the_param_groups(case):
    """Every argument of the constructor that is not wiring (the model, its loss, its
    ModelIO) is a key of every parameter group, with the value given."""
    cls, _, changed, _ = CASES[case]
    names = set(inspect.signature(cls.__init__).parameters) - WIRING
    opt = _make(case, _mlp())
    for group in opt.state_dict()["param_groups"]:
        assert names <= set(group), sorted(names - set(group))
        for key, value in changed.items():
            assert group[key] == value, key


@pytest.mark.parametrize("case", list(CASES))
def test_a_state_dict_restores_every_setting_and_the_run(case):
    """An optimizer made with the defaults and given the state_dict of one made with other
    settings has those settings and takes the same iterates, bit for bit; without the
    state it takes others (so the settings matter to the run)."""
    X, y = _data()
    model_a = _mlp()
    opt_a = _make(case, model_a)
    _run(case, model_a, opt_a, 3, X, y)
    saved_model = copy.deepcopy(model_a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    losses_a, x_a = _run(case, model_a, opt_a, 3, X, y)

    model_b = _mlp()
    model_b.load_state_dict(saved_model)
    opt_b = _make(case, model_b, settings={})  # the defaults
    opt_b.load_state_dict(saved_opt)
    for key, value in CASES[case][2].items():
        assert opt_b.param_groups[0][key] == value, key
    losses_b, x_b = _run(case, model_b, opt_b, 3, X, y)
    assert losses_b == losses_a
    assert torch.equal(x_b, x_a)

    model_c = _mlp()
    model_c.load_state_dict(saved_model)
    state = copy.deepcopy(saved_opt)
    opt_c = _make(case, model_c, settings={})  # the defaults, the same state otherwise
    for group, default in zip(state["param_groups"], opt_c.state_dict()["param_groups"]):
        group.update({k: v for k, v in default.items() if k != "params"})
    opt_c.load_state_dict(state)
    _, x_c = _run(case, model_c, opt_c, 3, X, y)
    assert not torch.equal(x_c, x_a)


@pytest.mark.parametrize("key", ["subsample", "seed", "l2", "solver", "max_iter"])
def test_truncated_newton_setting_written_as_an_attribute_is_recorded(key):
    model = _mlp()
    opt = SubsampledNewton(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
        model=model,
        loss_fn=CE,
    )
    value = {"subsample": 7, "seed": 12, "l2": 0.5, "solver": "cholesky", "max_iter": 4}[key]
    setattr(opt, key, value)
    assert getattr(opt, key) == value
    assert [g[key] for g in opt.state_dict()["param_groups"]] == [value, value]


def test_truncated_newton_settings_are_checked_at_each_step():
    X, y = _data()
    model = _mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = SubsampledNewton(groups, model=model, loss_fn=CE)
    closure = lambda: CE(model(X), y)  # noqa: E731 (never reached)
    opt.subsample = 0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['subsample'\] must be a number"):
        opt.step(closure, batch=(X, y))
    opt.subsample = 0.5
    opt.param_groups[0]["seed"] = 2**63
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['seed'\] must be an integer in"):
        opt.step(closure, batch=(X, y))
    opt.seed = 1
    opt.param_groups[0]["max_iter"] = 3  # one setting of the whole optimizer
    with pytest.raises(ValueError, match="max_iter is one setting of the whole SubsampledNewton"):
        opt.step(closure, batch=(X, y))


def test_a_loaded_ggn_curvature_needs_a_model():
    """A state whose curvature is the GGN, loaded into an optimizer without a model: a
    ValueError, and the optimizer keeps its own state."""
    model = _mlp()
    with_model = HessianFree(model.parameters(), model=model, loss_fn=CE)
    assert with_model.curvature == "ggn"
    plain = HessianFree(model.parameters())
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="curvature='ggn' needs model= and loss_fn="):
        plain.load_state_dict(with_model.state_dict())
    assert plain.state_dict() == before and plain.curvature == "hessian"


def test_a_truncated_newton_state_saved_before_the_settings_were_recorded_still_loads():
    """A state_dict whose groups lack the settings that were attributes (saved by an
    earlier hesse) keeps this optimizer's."""
    X, y = _data()
    model = _mlp()
    opt = SubsampledNewton(model.parameters(), model=model, loss_fn=CE, subsample=0.5, seed=3)
    _run("SubsampledNewton", model, opt, 1, X, y)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("curvature", "subsample", "seed", "l2", "solver", "max_iter", "dense_max"):
            del group[key]
    fresh = SubsampledNewton(model.parameters(), model=model, loss_fn=CE, subsample=0.5, seed=3)
    fresh.load_state_dict(old)
    assert (fresh.subsample, fresh.seed, fresh.solver, fresh.curvature) == (
        0.5,
        3,
        "auto",
        "hessian",
    )


# -- the reducer ---------------------------------------------------------------------------
class Recording(Reducer):
    """The local reducer, recording each call: (point, call site)."""

    def __init__(self, sharded: bool = False):
        self.calls: list[tuple] = []
        self.sharded = sharded

    def evaluate(self, name, closure, flat, graph=False):
        self.calls.append(("evaluate", name))
        return super().evaluate(name, closure, flat, graph)

    def batch(self, batch):
        self.calls.append(("batch",))
        return super().batch(batch)

    def operator(self, cls, *args, **kwargs):
        self.calls.append(("operator", cls.__name__))
        return super().operator(cls, *args, **kwargs)

    def mean(self, name, compute, like):
        self.calls.append(("mean", name))
        return super().mean(name, compute, like)

    def attempt(self, name, fn, *args):
        self.calls.append(("attempt", name))
        return super().attempt(name, fn, *args)

    def check(self, name, error):
        self.calls.append(("check", name, error is not None))
        return super().check(name, error)

    def shard_seed(self, seed):
        self.calls.append(("shard_seed", seed))
        return super().shard_seed(seed)


def _one_step(opt, model, X, y, **kw):
    rec = Recording()
    opt._reducer = rec

    def closure():
        opt.zero_grad()
        loss = CE(model(X), y)
        loss.backward()
        return loss

    opt.step(closure, **kw)
    return rec.calls


START, SEARCH = "the start of a step", "the line search"
SUBSAMPLE = "drawing the curvature's subsample"


@pytest.mark.parametrize(
    "make, kw, expected",
    [
        (
            lambda m: HessianFree(m.parameters(), model=m, loss_fn=CE, subsample=0.5, seed=4),
            {"batch": True},
            [
                ("evaluate", f"HessianFree: {START}"),
                ("batch",),
                ("attempt", SUBSAMPLE),
                ("shard_seed", 4),
                ("operator", "GGNOperator"),
                ("evaluate", "HessianFree: CG backtracking"),
            ],
        ),
        (
            lambda m: SubsampledNewton(m.parameters(), model=m, loss_fn=CE, subsample=8, seed=2),
            {"batch": True},
            [
                ("evaluate", f"SubsampledNewton: {START}"),
                ("batch",),
                ("attempt", SUBSAMPLE),
                ("shard_seed", 2),
                ("operator", "HessianOperator"),  # the MLP's Hessian: from products
                ("evaluate", f"SubsampledNewton: {SEARCH}"),
            ],
        ),
        (
            lambda m: NewtonCG(m.parameters()),
            {},
            [("evaluate", f"NewtonCG: {START}"), ("batch",), ("evaluate", f"NewtonCG: {SEARCH}")],
        ),
        (
            lambda m: LBFGS(m.parameters(), max_iter=1),
            {},
            [("evaluate", f"L-BFGS: {START}"), ("evaluate", f"L-BFGS: {SEARCH}")],
        ),
        (
            lambda m: AdaHessian(m.parameters()),
            {},
            [("evaluate", "AdaHessian: the step's evaluation")],
        ),
        (
            lambda m: Sophia(m.parameters(), estimator="gnb", seed=5),
            {"outputs_fn": True},
            [
                ("check", "Sophia: outputs_fn", False),
                ("evaluate", "Sophia: the step's evaluation"),
                ("shard_seed", 5),
                ("mean", "Sophia: the Gauss-Newton-Bartlett gradient"),
            ],
        ),
        (
            lambda m: KFAC(m, loss_fn=CE, fisher="type-2"),
            {"batch": True},
            [
                ("check", "KFAC: the batch", False),
                ("evaluate", "KFAC: the step's evaluation"),
                ("batch",),
                ("operator", "KFACOperator"),
            ],
        ),
        (
            lambda m: KFAC(m),
            {},
            [
                ("check", "KFAC: the batch", False),
                ("evaluate", "KFAC: the step's evaluation"),
                ("batch",),
                ("mean", "KFAC: the factors"),
            ],
        ),
    ],
    ids=[
        "HessianFree",
        "SubsampledNewton",
        "NewtonCG",
        "LBFGS",
        "AdaHessian",
        "Sophia",
        "KFAC",
        "KFAC-closure",
    ],
)
def test_the_reducer_receives_the_named_calls(make, kw, expected):
    """Each optimizer's step calls its reducer where data parallelism must communicate,
    naming the call site: the sequence a step begins with."""
    X, y = _data()
    model = _mlp()
    kw = {k: ((X, y) if k == "batch" else (lambda: model(X))) for k in kw}
    calls = _one_step(make(model), model, X, y, **kw)
    assert calls[: len(expected)] == expected


def test_the_reducer_is_the_local_one_by_default_and_the_identity():
    X, y = _data()
    model = _mlp()
    opt = HessianFree(model.parameters(), model=model, loss_fn=CE)
    assert opt._reducer is LOCAL and not LOCAL.sharded
    assert LOCAL.batch((X, y)) == (X, y) and LOCAL.shard_seed(17) == 17
    t = [torch.ones(2), None]
    assert LOCAL.mean("m", lambda: (t, 3), []) == (t, 3.0)
    assert LOCAL.attempt("a", lambda a, b: a + b, 2, 3) == 5
    LOCAL.check("c", None)
    with pytest.raises(KeyError, match="bad"):
        LOCAL.check("c", KeyError("bad"))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_a_sharded_reducer_averages_the_shards_dense_curvature(curvature):
    """SubsampledNewton's dense curvature: the GGN in one batched pass, across processes
    each shard's matrix averaged by the reducer (``mean``); the Hessian of this MLP (not
    linear in its parameters: the one pass would cost more) from the operator's products,
    locally and across processes. The same matrix either way, so the same iterates (to
    rounding)."""
    X, y = _data()
    runs = []
    for sharded in (False, True):
        model = _mlp()
        opt = SubsampledNewton(
            model.parameters(), model=model, loss_fn=CE, subsample=0.5, l2=0.1, curvature=curvature
        )
        rec = Recording(sharded=sharded)
        opt._reducer = rec
        _, x = _run("SubsampledNewton", model, opt, 3, X, y)
        assert opt.global_state()["dense_solves"] == 3
        calls = [c for c in rec.calls if c[0] in ("operator", "mean")]
        # one draw per step through attempt (across processes the shard's one-pass draw
        # is inside the reducer's mean, whose collective carries a failure)
        draws = 0 if sharded and curvature == "ggn" else 3
        assert [c for c in rec.calls if c[0] == "attempt"] == [("attempt", SUBSAMPLE)] * draws
        runs.append((x, calls))
    (x_local, calls_local), (x_sharded, calls_sharded) = runs
    if curvature == "ggn":
        assert calls_local == []
        assert calls_sharded == [("mean", "the dense curvature of a shard")] * 3
    else:
        assert calls_local == [("operator", "HessianOperator")] * 3
        shard = [("mean", "the dense curvature of a shard"), ("operator", "HessianOperator")]
        assert calls_sharded == shard * 3  # asked, refused (the second term), products
    torch.testing.assert_close(x_sharded, x_local, rtol=1e-10, atol=1e-12)


def test_sophia_gnb_refuses_outputs_without_rows():
    """A refresh from no sample would decay the estimate towards zero unnoticed."""
    model = _mlp()
    X, y = _data()
    opt = Sophia(model.parameters(), estimator="gnb", update_each=1)

    def closure():
        opt.zero_grad()
        loss = CE(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="outputs_fn\\(\\) returned no rows of logits"):
        opt.step(closure, outputs_fn=lambda: model(X[:0]))


# -- seeds ----------------------------------------------------------------------------------
def _reference_seed(seed: int, *stream) -> int:
    """derive_seed's documented rule, written out: BLAKE2b (8 bytes, personalised
    "hesse-seed") of "i<seed>;" then "s<len>:<utf-8>" per string and "i<n>;" per integer,
    read little-endian, the top 63 bits."""
    data = f"i{seed};".encode()
    for item in stream:
        if isinstance(item, str):
            raw = item.encode()
            data += f"s{len(raw)}:".encode() + raw
        else:
            data += f"i{item};".encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"hesse-seed").digest()
    return int.from_bytes(digest, "little") // 2


@pytest.mark.parametrize(
    "seed, stream",
    [(0, ()), (0, ("hutchinson", 3)), (2**63 - 1, ("rank", 2)), (7, ("é", -1, "", 0))],
)
def test_derive_seed_follows_its_rule(seed, stream):
    value = derive_seed(seed, *stream)
    assert value == _reference_seed(seed, *stream)
    assert 0 <= value < 2**63
    torch.Generator().manual_seed(value)  # what manual_seed takes


def test_derive_seed_separates_streams():
    """Distinct purposes, steps, ranks and seeds give distinct seeds, where the magic
    primes met: seed + 7919 t and seed + 104729 t' at t = 104729, t' = 7919."""
    assert 0 + 7919 * 104729 == 0 + 104729 * 7919
    assert derive_seed(0, "subsample", 104729) != derive_seed(0, "preconditioner", 7919)
    seen = {derive_seed(s, p, t) for s in range(4) for p in ("a", "b", "ab") for t in range(50)}
    assert len(seen) == 4 * 3 * 50
    assert derive_seed(1, "a", 1) != derive_seed(1, "a1") != derive_seed(1, "a", "1")


@pytest.mark.parametrize(
    "seed, stream, error, match",
    [
        (1.5, (), TypeError, "seed must be an integer, got float"),
        (-1, (), ValueError, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        (2**63, (), ValueError, r"seed must be an integer in \[0, 2\*\*63\)"),
        (0, ("a", 1.0), TypeError, r"stream\[1\] must be a str or an int .* got float 1.0"),
        (0, (True,), TypeError, r"stream\[0\] must be a str or an int .* got bool True"),
    ],
)
def test_derive_seed_refuses_bad_input(seed, stream, error, match):
    with pytest.raises(error, match=match):
        derive_seed(seed, *stream)


def test_the_probes_are_drawn_from_the_derived_seed():
    """AdaHessian's probe at step t is the shared Rademacher draw from a generator seeded
    with derive_seed(seed, "hutchinson", t). On f = sum_k w_2k w_2k+1 (H pairs the
    coordinates), z * Hz = (z_2k z_2k+1, z_2k z_2k+1): the probe, read off the estimate."""
    w = torch.linspace(-1, 1, 16, dtype=f64).requires_grad_()
    opt = AdaHessian([w], seed=11)

    def closure():
        opt.zero_grad()
        loss = (w[0::2] * w[1::2]).sum()
        loss.backward()
        return loss

    for t in range(4):
        opt.step(closure)
        gen = torch.Generator().manual_seed(derive_seed(11, "hutchinson", t))
        (z,) = rademacher_like([w], gen)
        pairs = z[0::2] * z[1::2]
        expected = torch.stack([pairs, pairs], dim=1).reshape(-1)
        assert torch.equal(opt.state[w]["hess_diag"], expected)
