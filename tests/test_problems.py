"""hesse.problems: the classic test functions, their starts and their minima."""

from __future__ import annotations

import math

import pytest
import torch

from hesse.problems import FUNCTIONS, ClassicFunction, classic_function

WITH_X_STAR = [name for name, f in FUNCTIONS.items() if f.x_star is not None]

# Minimisers found numerically (scipy trust-exact from the standard start with autograd
# Hessians, then Newton steps, float64) for the functions whose minimiser has no closed form.
NUMERIC_MINIMISERS = {
    "powell-badly-scaled": (1.0981594177191475e-05, 9.106146009993509),
    "jennrich-sampson": (0.25782521359213045, 0.2578252137981544),
    "bard": (0.0824105588826639, 1.13303605361685, 2.343695215873724),
    "gaussian": (0.39895613783875666, 1.0000190844878059, 0.0),
    "meyer": (0.005609636471682687, 6181.3463461890815, 345.22363462086145),
    "kowalik-osborne": (
        0.19280693466833973, 0.19128232617485563, 0.12305650612780099, 0.1360623295584881,
    ),
    "brown-dennis": (
        -11.594439904762165, 13.203630051207204, -0.4034394881768595, 0.23677877445573622,
    ),
    "osborne-1": (
        0.3754100521069478, 1.9358469127118583, -1.4646871366129108, 0.012867534640056261,
        0.02212269966167468,
    ),
    "osborne-2": (
        1.3099771546273007, 0.431553794602989, 0.633661698960724, 0.5994305347859162,
        0.7541832263280114, 0.9042885798596337, 1.3658118352370279, 4.823698817227158,
        2.3986848661317546, 4.568874597667672, 5.6753414705806415,
    ),
    "watson": (
        -0.01572508640171649, 1.0124348693690841, -0.23299162595657247, 1.260430087797792,
        -1.5137289227194983, 0.9929964324294193,
    ),
    "penalty-1": (0.15812230111311637,) * 10,
    "penalty-2": (
        0.19998360519782363, 0.010350648471292303, 0.01960493448043841, 0.032089067220685656,
        0.0499326773996413, 0.07651399515399358, 0.11862407286950417, 0.1921448723355767,
        0.34732058694184353, 0.36916437415935077,
    ),
    "discrete-boundary-value": (
        -0.04316498251876486, -0.08157715653538687, -0.11448571438052928, -0.14097357686259668,
        -0.1599086961819831, -0.16987720231277492, -0.16908998378120835, -0.15524953522183182,
        -0.125355891678935, -0.07541653368589209,
    ),
    "broyden-tridiagonal": (
        -0.5707221320112248, -0.681806949984275, -0.7022100760176601, -0.7055106298950804,
        -0.7049061557287437, -0.7014966070298512, -0.6918893223547983, -0.6657965144058536,
        -0.5960351090263657, -0.4164122575286933,
    ),
    "broyden-banded": (
        -0.4283028635872502, -0.47659642435629024, -0.5196524636468617, -0.5580993248321808,
        -0.5925061568294574, -0.624503682199468, -0.6232394714405911, -0.6213938417965735,
        -0.6204535966590873, -0.5864692707204351,
    ),
    "chebyquad": (
        0.043152760149847515, 0.19309084038336302, 0.2663287068897212, 0.5000000000000061,
        0.5000000000000028, 0.7336712931103326, 0.806909159616672, 0.9568472398502956,
    ),
}  # fmt: skip

# Values at the standard start that follow by hand from the formulas.
START_VALUES = {
    "rosenbrock": 24.2,
    "beale": 14.203125,
    "helical-valley": 2500.0,
    "powell-singular": 215.0,
    "extended-powell": 645.0,
    "wood": 19192.0,
    "watson": 30.0,
    "broyden-tridiagonal": 21.0,
    "broyden-banded": 360.0,
    "freudenstein-roth": 400.5,
}


def _value_and_grad(f: ClassicFunction, point) -> tuple[float, torch.Tensor]:
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    value = f(x)
    (g,) = torch.autograd.grad(value, x)
    return value.item(), g


def _assert_minimum_value(f: ClassicFunction, value: float) -> None:
    if f.f_star == 0:
        assert abs(value) <= 1e-12
    else:
        assert value == pytest.approx(f.f_star, rel=1e-5)


def test_registry_is_consistent():
    assert len(FUNCTIONS) >= 30
    for name, f in FUNCTIONS.items():
        assert f.name == name
        assert len(f.start) == f.n
        assert f.x_star is None or len(f.x_star) == f.n
        assert f.reference
    assert set(NUMERIC_MINIMISERS) | set(WITH_X_STAR) == set(FUNCTIONS)


@pytest.mark.parametrize("name", WITH_X_STAR)
def test_value_and_stationarity_at_x_star(name):
    f = FUNCTIONS[name]
    value, g = _value_and_grad(f, f.x_star)
    _assert_minimum_value(f, value)
    assert g.abs().max().item() <= 1e-10 * max(1.0, f.f_star)


@pytest.mark.parametrize("name", sorted(NUMERIC_MINIMISERS))
def test_documented_minimum_at_numeric_minimiser(name):
    f = FUNCTIONS[name]
    value, g = _value_and_grad(f, NUMERIC_MINIMISERS[name])
    _assert_minimum_value(f, value)
    # Meyer is badly scaled (Hessian eigenvalues from 2e-2 to 2e14): the gradient in x1 is
    # only down to ~1e-3 at a point given to double precision.
    gtol = 1e-2 if name == "meyer" else 1e-6 * max(1.0, f.f_star)
    assert g.norm().item() <= gtol


def test_log_barrier_minimum_is_closed_form():
    f = classic_function("log-barrier-quadratic")
    a = torch.linspace(1, 1000, 100, dtype=torch.float64)
    assert torch.allclose(torch.tensor(f.x_star, dtype=torch.float64), 1 / torch.sqrt(2 * a))
    assert f.f_star == pytest.approx((0.5 * torch.log(2 * a) + 0.5).sum().item(), rel=1e-14)
    assert torch.isnan(f(-f.x0()))


@pytest.mark.parametrize("name", sorted(START_VALUES))
def test_value_at_start(name):
    f = FUNCTIONS[name]
    assert f(f.x0()).item() == pytest.approx(START_VALUES[name], rel=1e-14)


def test_helical_valley_uses_mgh_branch_of_the_angle():
    # theta(-1, -1) = arctan(1) / (2 pi) + 1/2 = 0.625, so x3 = 6.25 zeroes the first residual
    f = classic_function("helical-valley")
    x = torch.tensor([-1.0, -1.0, 6.25], dtype=torch.float64)
    assert f(x).item() == pytest.approx(100 * (math.sqrt(2) - 1) ** 2 + 6.25**2, rel=1e-14)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_float32_is_kept(name):
    f = FUNCTIONS[name]
    x = f.x0(dtype=torch.float32)
    value = f(x)
    assert value.dtype == torch.float32 and value.shape == ()
    assert value.item() == pytest.approx(f(f.x0()).item(), rel=1e-3)


def test_x0_scale_and_fresh_tensor():
    f = classic_function("wood")
    x = f.x0(10.0, dtype=torch.float32)
    assert x.dtype == torch.float32
    assert torch.equal(x, 10 * torch.tensor(f.start, dtype=torch.float32))
    x.zero_()
    assert torch.equal(f.x0(), torch.tensor(f.start, dtype=torch.float64))


def test_bad_name_lists_known_names():
    with pytest.raises(ValueError, match=r"'nope'.*known:.*rosenbrock"):
        classic_function("nope")
    assert classic_function("Powell_Singular") is FUNCTIONS["powell-singular"]


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        classic_function("rosenbrock")(torch.zeros(3))


@pytest.mark.parametrize(
    "name", ["helical-valley", "gulf", "watson", "penalty-2", "broyden-banded", "chebyquad"]
)
def test_gradcheck(name):
    f = FUNCTIONS[name]
    x = f.x0().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_vmap_over_points():
    f = classic_function("chebyquad")
    xs = torch.stack([f.x0(), f.x0(0.5)])
    values = torch.func.vmap(f)(xs)
    assert torch.allclose(values, torch.stack([f(xs[0]), f(xs[1])]))
