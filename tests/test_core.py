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


# -- random signs: the one Rademacher draw ------------------------------------------------
def test_rademacher_is_randint_mapped_to_signs():
    # Pin the draw itself: every estimator's stream of probes (and so every seeded result of
    # hesse.linalg and of AdaHessian / Sophia) is this one call to torch.randint.
    from hesse._core._random import rademacher

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = rademacher(
            (7, 5), dtype=dtype, device="cpu", generator=torch.Generator().manual_seed(3)
        )
        ref = torch.randint(0, 2, (7, 5), generator=torch.Generator().manual_seed(3), dtype=dtype)
        assert z.dtype == dtype and z.shape == (7, 5)
        assert torch.equal(z, 2 * ref - 1)
        assert set(z.flatten().tolist()) == {-1.0, 1.0}


def test_rademacher_rows_do_not_depend_on_how_many_are_drawn_at_once():
    # On CPU a (k, n) draw is k draws of (n,) in order: the trace estimators' probes do not
    # change with batch_size.
    from hesse._core._random import rademacher

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    block = rademacher((4, 9), dtype=torch.float64, device="cpu", generator=g1)
    rows = [rademacher((9,), dtype=torch.float64, device="cpu", generator=g2) for _ in range(4)]
    assert torch.equal(block, torch.stack(rows))


# -- one status vocabulary ------------------------------------------------------------------
def test_status_is_a_string_that_hashes_like_one():
    from hesse._core._status import Status

    assert Status.FTOL == "ftol" and str(Status.FTOL) == "ftol" and f"{Status.FTOL}" == "ftol"
    assert Status.FTOL in {"ftol"} and {"ftol": 1}[Status.FTOL] == 1
    assert {Status.NO_PROGRESS: 1}["no_progress"] == 1
    assert Status("max_evaluations") is Status.MAX_EVALUATIONS
    import hesse.linalg

    assert hesse.linalg.Status is Status  # defined once, re-exported


def test_every_status_has_one_advice_template():
    from hesse._core._status import ADVICE_NAMES, ADVICE_TEMPLATES, Status

    assert set(ADVICE_TEMPLATES) == set(Status)
    # what is not an ending to act on has no advice; every other ending says what to change
    quiet = {Status.CONVERGED, Status.BOUNDARY, Status.BUDGET}
    for s in Status:
        text = s.advice()
        assert (text == "") == (s in quiet), s
        assert "{" not in text  # every placeholder has a default
    assert Status.MAX_ITERATIONS.advice() == "raise max_iter or loosen tol"
    assert Status.MAX_ITERATIONS.advice(tol="rtol") == "raise max_iter or loosen rtol"
    assert Status.MAX_EVALUATIONS.advice(max_evals="max_fev") == "raise max_fev"
    assert "wider dtype" in Status.PRECISION.advice()
    assert "minres" in Status.NEGATIVE_CURVATURE.advice()
    assert Status.NON_FINITE.advice(fun="the model") == "check the model, the data and the dtype"
    assert Status.TIME_LIMIT == "time_limit"  # the CLI's ending, in the vocabulary too
    assert Status.TIME_LIMIT.advice(time_limit="--time-limit") == "raise --time-limit"
    assert set(ADVICE_NAMES) >= {"max_iter", "tol", "max_evals", "fun", "x", "time_limit"}
    with pytest.raises(TypeError, match=r"Status.advice takes the names .*got \['maxiter'\]"):
        Status.MAX_ITERATIONS.advice(maxiter="n")
