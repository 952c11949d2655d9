"""hesse.distributed against one process on the concatenated data: 2 and 3 ranks (an
uneven split) of gloo on loopback, each rank a process of its own (as torchrun starts
them), through tests/distributed_worker.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hesse

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


def launch(scenario: str, world: int, tmp_path: Path, *, wait: float = 240.0, env=None):
    """Start ``world`` ranks; return each rank's results (None for a rank that wrote none)
    and the seconds until the last rank that writes results has written them."""
    out = tmp_path / scenario
    out.mkdir()
    base = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "STORE": str(tmp_path / f"{scenario}.store"),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out)],
            env={**base, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    start = time.monotonic()
    try:
        for r, p in enumerate(procs):
            if scenario == "hangs" and r == 1:
                continue  # the silent rank: killed below
            p.wait(timeout=max(1.0, wait - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [p.stdout.read().decode(errors="replace") for p in procs]
    results = []
    for r in range(world):
        f = out / f"rank{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return results, elapsed, logs


def _ok(results, logs):
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote nothing:\n{logs[r]}"
        assert "uncaught" not in res, f"rank {r}:\n{res['uncaught']}"


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks uneven"])
def operator_run(request, tmp_path_factory):
    results, _, logs = launch("operators", request.param, tmp_path_factory.mktemp("ops"))
    _ok(results, logs)
    return results


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "fd"])
def test_products_match_one_process(operator_run, kind):
    ref = operator_run[0][f"ref_{kind}_v"]
    tol = 1e-10 if kind != "fd" else 1e-8  # fd: differences of gradients at ranks' own h
    for res in operator_run:
        torch.testing.assert_close(res[f"{kind}_v"], ref, rtol=tol, atol=tol)
        torch.testing.assert_close(res[f"{kind}_vec"], ref[:, 0], rtol=tol, atol=tol)


def test_a_ddp_wrapped_model_gives_the_same_operator(operator_run):
    for res in operator_run:
        assert torch.equal(res["ddp_ggn_v"], res["ggn_v"])


def test_hessian_matches_dense_reference(operator_run):
    # Independent of hesse's single-process operator: torch.func.hessian on all the data.
    res = operator_run[0]
    torch.testing.assert_close(
        res["hessian_v"], res["ref_dense_h"] @ res["V"], rtol=1e-10, atol=1e-12
    )


def test_gradient_matches_one_process(operator_run):
    ref = operator_run[0]
    for res in operator_run:
        torch.testing.assert_close(res["loss"], ref["ref_loss"], rtol=1e-12, atol=0)
        torch.testing.assert_close(res["grad"], ref["ref_grad"], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "what", ["eig", "trace", "xtrace", "hutchpp", "density", "cg", "diag", "nystrom"]
)
def test_estimates_match_one_process(operator_run, what):
    """Each rank asked for its own seed; every rank must draw rank 0's probes, so all
    agree exactly with each other and with one process seeded as rank 0."""
    ref = torch.as_tensor(operator_run[0][f"ref_{what}"])
    for res in operator_run:
        assert torch.equal(torch.as_tensor(res[what]), torch.as_tensor(operator_run[0][what]))
        torch.testing.assert_close(torch.as_tensor(res[what]), ref, rtol=1e-8, atol=1e-10)


def test_layer_report_matches_one_process(operator_run):
    ref = operator_run[0]["ref_layers"]
    assert {r["size"] for r in ref} == {36, 21}  # one block formed densely, one by Lanczos
    for res in operator_run:
        assert [r["verdict"] for r in res["layers"]] == [r["verdict"] for r in ref]
        for row, want in zip(res["layers"], ref):
            for key in ("top_eigenvalue", "min_eigenvalue", "trace"):
                assert abs(row[key] - want[key]) <= 1e-8 * max(1.0, abs(want[key])), key


def test_monte_carlo_fisher_same_on_every_rank(operator_run):
    for res in operator_run[1:]:
        assert torch.equal(res["mc_v"], operator_run[0]["mc_v"])
    # An estimate of the GGN, not the GGN itself: close in expectation only.
    assert not torch.allclose(operator_run[0]["mc_v"], operator_run[0]["ggn_v"])


@pytest.mark.parametrize("world", [2, 3])
def test_optimizer_trajectories_match_one_process(tmp_path, world):
    results, _, logs = launch("optimizers", world, tmp_path)
    _ok(results, logs)
    ref = results[0]
    names = [k[: -len("_losses")] for k in ref if k.endswith("_losses") and "ref_" not in k]
    assert len(names) == 9
    for name in names:
        for r, res in enumerate(results):
            # every rank takes the same steps (rank 1 started elsewhere and was synced)
            assert torch.equal(res[f"{name}_x"], ref[f"{name}_x"]), (name, r)
            if name == "sophia-gnb":
                continue  # labels are sampled per shard: the same law, not the same draws
            torch.testing.assert_close(
                res[f"{name}_losses"], ref[f"ref_{name}_losses"], rtol=1e-9, atol=1e-12
            )
            torch.testing.assert_close(res[f"{name}_x"], ref[f"ref_{name}_x"], rtol=1e-7, atol=1e-9)
        for losses in (ref[f"ref_{name}_losses"], ref[f"{name}_losses"]):
            assert losses[-1] < losses[0], name  # the trajectories go somewhere


@pytest.mark.parametrize("world", [2, 3])
def test_kfac_factors_and_trajectories_match_one_process(tmp_path, world):
    """KFAC data-parallel: the factors all-reduced by sample counts are those of one
    process on all the data (operators, EKFAC's eigenvalues, the optimizer's running
    averages), and so are the steps, within 1e-10 in float64; a rank without data too."""
    results, _, logs = launch("kfac", world, tmp_path)
    _ok(results, logs)
    ref = results[0]

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    for res in results:
        for fisher in ("type-2", "empirical"):
            for (a, g), (ra, rg) in zip(res[f"op_{fisher}"], ref[f"ref_op_{fisher}"], strict=True):
                close(a, ra)
                close(g, rg)
        for e, re in zip(res["ekfac"], ref["ref_ekfac"], strict=True):
            close(e, re)
        for row, want in zip(res["layers"], ref["ref_layers"], strict=True):
            assert want["kfac_error"] > 1e-3  # KFAC is not exact on this network
            assert abs(row["kfac_error"] - want["kfac_error"]) <= 1e-10 * want["kfac_error"]
        for name in ("closure", "type-2"):
            for key in (name, f"{name}_empty"):
                close(res[f"{key}_losses"], ref[f"ref_{name}_losses"])
                close(res[f"{key}_x"], ref[f"ref_{name}_x"])
                close(res[f"{key}_A"], ref[f"ref_{name}_A"])
    for name in ("closure", "type-2"):
        losses = ref[f"ref_{name}_losses"]
        assert losses[-1] < losses[0], name  # the trajectories go somewhere
    for r, res in enumerate(results):
        assert "pass the plain model (ddp.module)" in res["ddp_error"]
        if r == 0:
            assert res["batch_error"].startswith("ValueError: fisher='type-2' computes")
        else:
            assert res["batch_error"].startswith("RankError:") and "[0]" in res["batch_error"]
        assert res["empty_error"] == "ValueError: no rank holds any data: every shard is empty"


def test_empty_shards_and_mismatched_parameters(tmp_path):
    results, _, logs = launch("edges", 2, tmp_path)
    _ok(results, logs)
    ref = results[0]
    for res in results:
        torch.testing.assert_close(res["hv"], ref["ref_hv"], rtol=1e-10, atol=1e-12)
        assert torch.equal(res["eig"], ref["eig"])
        assert torch.equal(res["grad"], ref["grad"])
        # rank 1 (samples=0) follows rank 0's trajectory, which is one process's
        torch.testing.assert_close(res["x"], ref["ref_x"], rtol=1e-9, atol=1e-12)
        assert res["samples_kept"]
        assert res["empty_error"] == "ValueError: no rank holds any data: every shard is empty"
        assert "pass the plain model (ddp.module)" in res["ddp_error"]
        for key in ("size_error", "opt_size_error"):
            assert res[key].startswith("ValueError:") and "differ in size" in res[key], res[key]
        msg = res["mismatch_error"]
        assert msg.startswith("ValueError: the model's parameters differ between ranks"), msg
        assert "1e-03" in msg or "0.001" in msg, msg


def test_precision_sum_losses_and_empty_tensor_shards(tmp_path):
    results, _, logs = launch("precision", 2, tmp_path)
    _ok(results, logs)
    ref = results[0]
    for res in results:
        for name in ("mean", "sum"):
            torch.testing.assert_close(
                res[f"f32_{name}"], ref[f"ref_f32_{name}"], rtol=1e-5, atol=0
            )
        assert bool(torch.isfinite(res["f16"]).all())
        torch.testing.assert_close(res["f16"], ref["ref_f16"], rtol=2e-3, atol=0)
        for name in ("fisher", "hessian"):
            torch.testing.assert_close(
                res[f"empty_{name}"], ref[f"ref_empty_{name}"], rtol=1e-12, atol=1e-14
            )
        assert bool(torch.isfinite(res["empty_grad"]).all())
        assert torch.equal(res["empty_grad"], ref["empty_grad"])
        torch.testing.assert_close(res["hf_x"], ref["ref_hf_x"], rtol=1e-9, atol=1e-12)
        assert torch.equal(res["sub_x"], ref["sub_x"])
        torch.testing.assert_close(res["hf2_x"], ref["ref_hf2_x"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["sub3_x"], ref["ref_sub3_x"], rtol=1e-9, atol=1e-12)
    assert (ref["sub3_x"] - ref["sub3_x0"]).norm() > 1e-3  # the trajectory went somewhere
    assert float(ref["ref_f16"].abs().max()) > 1.0  # the float16 case is a real one


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_multiply_different_operands_all_raise(tmp_path, world):
    """Column counts, vectors or trace budgets that differ between ranks: the same
    ValueError on every rank (not gloo's SIGABRT, not a wrong number), and the operator
    still multiplies correctly afterwards."""
    results, _, logs = launch("disagree", world, tmp_path)
    _ok(results, logs)
    for res in results:
        for case in ("columns", "budget"):
            msg = res[f"{case}_error"]
            assert msg and msg.startswith("ValueError") and "different sizes" in msg, msg
        msg = res["vectors_error"]
        assert msg and msg.startswith("ValueError") and "different vectors" in msg, msg
        assert torch.equal(res["eig_seeds"], results[0]["eig_seeds"])
        torch.testing.assert_close(
            res["hv_after"], results[0]["ref_hv_after"], rtol=1e-10, atol=1e-12
        )
    assert results[1]["backward_error"].startswith("ValueError: the closure returned the loss")
    for r in [0, *range(2, world)]:
        msg = results[r]["backward_error"]
        assert msg.startswith("RankError") and "rank(s) [1]" in msg, msg


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path):
    """The README's command: 2 ranks under torchrun print what one process prints."""
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    outs = []
    for cmd in (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        [sys.executable],
    ):
        run = subprocess.run(
            [*cmd, str(example)], capture_output=True, text=True, timeout=240, env=env
        )
        assert run.returncode == 0, run.stdout + run.stderr
        outs.append(run.stdout)
    two, one = outs
    assert "2 rank(s)" in two and "1 rank(s)" in one
    assert "parameters identical on all 2 rank(s): True" in two

    def numbers(text, key):
        return [float(line.split(key)[1].split()[0]) for line in text.splitlines() if key in line]

    for key in ("top Hessian eigenvalue at init: ", "GGN trace at init: ", "loss "):
        a, b = numbers(two, key), numbers(one, key)
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-8, atol=0)


def test_a_rank_that_raises_stops_the_others(tmp_path):
    results, _, logs = launch("raises", 3, tmp_path)
    _ok(results, logs)
    # rank 1 raised its own error; ranks 0 and 2 a RankError naming rank 1
    for lin in (False, True):
        assert results[1][f"eig_error_{lin}"].startswith("IndexError")
    assert results[1]["opt_error"] == "ValueError: rank 1's closure is broken"
    assert results[1]["make_error"].startswith("ValueError: lr must be")
    assert results[1]["sophia_error"].startswith("ValueError: estimator='gnb' needs")
    assert results[1]["nan_loss_error"].startswith("NonFiniteError: the loss at the current")
    for res in results:  # rank 1 made one product more: every rank sees it
        assert res["step_error"].startswith("RankError"), res["step_error"]
    assert "out of step" in results[0]["step_error"]
    for r, res in enumerate(results):  # at another call site: each rank names its own
        msg = res["site_error"]
        assert msg.startswith("RankError") and "out of step" in msg, msg
        where = "the line search" if r == 1 else "the start of a step"
        assert f"rank {r} at '{where}' (call 2 of step 4)" in msg, msg
        other = "rank 1 at call site #" if r != 1 else "rank 0 at call site #"
        assert other in msg, msg  # a site this rank never reached: by its number
        # an operator's collectives: by call site and call number (no step)
        msg = res["product_error"]
        assert msg.startswith("RankError") and "out of step" in msg, msg
        assert "rank 0 at 'the operands of a HessianOperator product' (call 1)" in msg, msg
        assert "rank 1 at 'the operands of a GGNOperator product' (call 2)" in msg, msg
    for r in (0, 2):
        keys = ("eig_error_False", "eig_error_True", "nan_loss_error", "opt_error", "make_error")
        for key in (*keys, "sophia_error"):
            msg = results[r][key]
            assert msg.startswith("RankError") and "rank(s) [1]" in msg, msg


def test_a_silent_rank_times_out(tmp_path):
    results, elapsed, logs = launch("hangs", 2, tmp_path, env={"HANG_SECONDS": "120"})
    res = results[0]
    assert res is not None, logs[0]
    assert res["error"].startswith("RankError") and "within 2 s" in res["error"], res
    assert res["waited"] < 10  # the 2 s timeout, not the rank's 120 s of silence
    assert elapsed < 100


def test_a_rank_that_exits_stops_the_others(tmp_path):
    results, _, logs = launch("exits", 2, tmp_path)
    assert results[1] is None  # it died
    res = results[0]
    assert res is not None, logs[0]
    assert "uncaught" not in res, res["uncaught"]
    assert res["error"].startswith("RankError"), res["error"]


def test_needs_a_process_group():
    model = torch.nn.Linear(2, 1)
    data = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(RuntimeError, match="init_process_group"):
        hesse.distributed.HessianOperator(model, torch.nn.MSELoss(), data)
    with pytest.raises(RuntimeError, match="init_process_group"):
        hesse.distributed.LBFGS(model.parameters(), samples=4)


def test_bad_timeout_and_samples():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        hesse.distributed.set_default_timeout(0)
    with pytest.raises(ValueError, match="samples must be"):
        hesse.distributed._optim._check_samples(-1)


_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(
    _GPUS == 0 or not torch.distributed.is_nccl_available(), reason="needs a CUDA device and nccl"
)
@pytest.mark.parametrize("world", [1, 2], ids=["1 rank", "2 ranks"])
def test_nccl_on_cuda_matches_one_process(tmp_path, world):
    """The nccl path (CUDA buffers, polled completion, the operand check on the device):
    one rank on one GPU, and two ranks where two GPUs exist (nccl refuses two ranks on one
    GPU)."""
    if world > _GPUS:
        pytest.skip(f"needs {world} CUDA devices, this machine has {_GPUS}")
    results, _, logs = launch("nccl", world, tmp_path, env={"BACKEND": "nccl"})
    _ok(results, logs)
    ref = results[0]
    for res in results:
        torch.testing.assert_close(res["hv"], ref["ref_hv"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["eig"], ref["ref_eig"], rtol=1e-8, atol=1e-10)
        assert abs(res["trace"] - ref["ref_trace"]) <= 1e-8 * abs(ref["ref_trace"])
        torch.testing.assert_close(res["x"], ref["ref_x"], rtol=1e-8, atol=1e-10)


def test_a_tag_says_where_a_rank_was():
    # an optimizer's tag: site, step, call; an operator's: site and call (step 0: none); an
    # integer tag: its number
    from hesse.distributed._comm import _where, site

    assert _where([site("the line search"), 4, 2]) == "'the line search' (call 2 of step 4)"
    product = site("the operands of a GGNOperator product")
    assert _where([product, 0, 3]) == "'the operands of a GGNOperator product' (call 3)"
    assert _where([0, 0, 7]) == "collective 7"
