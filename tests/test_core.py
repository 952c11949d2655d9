import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hesse import NonFiniteError, ParamSpace
from hesse._core import check_operand, check_scalar

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(1, 3))
def test_param_space_round_trips(shape_list, k):
    tensors = [torch.randn(tuple(s), dtype=torch.float64) for s in shape_list]
    space = ParamSpace(tensors)
    flat = space.flatten(tensors)
    assert space.size == flat.numel() == sum(t.numel() for t in tensors)
    for a, b in zip(space.unflatten(flat), tensors):
        assert torch.equal(a, b)
    M = torch.randn(space.size, k, dtype=torch.float64)
    cols = space.unflatten_columns(M)
    assert all(c.shape == (k, *t.shape) for c, t in zip(cols, tensors))
    assert torch.equal(space.flatten_columns(cols), M)
    # column j of M, unflattened, is the j-th slice
    for c, u in zip(cols, space.unflatten(M[:, k - 1].contiguous())):
        assert torch.equal(c[k - 1], u)


def test_param_space_rejects_bad_tensors():
    with pytest.raises(ValueError, match="at least one"):
        ParamSpace([])
    with pytest.raises(TypeError, match="floating point.*int64"):
        ParamSpace([torch.zeros(2, dtype=torch.long)], ["counts"])
    with pytest.raises(TypeError, match="one dtype"):
        ParamSpace([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])


def test_check_operand_messages():
    dev = torch.device("cpu")
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(4, k\), got shape \(3,\)"):
        check_operand(torch.zeros(3), 4, torch.float32, dev)
    with pytest.raises(TypeError, match="dtype torch.float32, got torch.float64"):
        check_operand(torch.zeros(4, dtype=torch.float64), 4, torch.float32, dev)
    with pytest.raises(TypeError, match="got list"):
        check_operand([0.0] * 4, 4, torch.float32, dev)
    with pytest.raises(NonFiniteError, match="1 NaN and 1 infinite"):
        check_operand(torch.tensor([0.0, float("nan"), float("inf"), 1.0]), 4, torch.float32, dev)
    V, single = check_operand(torch.zeros(4, 2), 4, torch.float32, dev)
    assert V.shape == (4, 2) and not single


def test_check_scalar():
    assert check_scalar(torch.tensor([2.0])).shape == ()
    with pytest.raises(ValueError, match=r"scalar.*got shape \(3,\)"):
        check_scalar(torch.zeros(3))
    with pytest.raises(TypeError, match="scalar torch.Tensor, got float"):
        check_scalar(1.0)


def test_all_finite_is_not_fooled_by_an_overflowing_sum():
    from hesse._core import all_finite

    huge = torch.full((4,), 3e38)  # finite, but the float32 sum overflows to inf
    assert all_finite(huge, torch.ones(2))
    assert not all_finite(torch.ones(2), torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
