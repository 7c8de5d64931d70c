"""The state walks of the chunked delta rule (the sequential loops over chunks: forward h, backward dh), compiled for
sm_90 at exactly the launch configurations our launch code uses for bf16, K = V = 128 at one and eight packed
4,096-token documents of 16 value heads, without and with initial / final states (bench/sm90_report.py, no GPU
needed; both V-block widths the walks pick by shape): ptxas may not spill more than 64 B in them, their loop must
prefetch (cp.async or TMA), and V is split so that they launch at least 4 programs per (sequence, value head). The
chunk-parallel kernels of the prepare (kkt + inverse, W / U), the output, local dv and the WY and q/k backward may
not spill at all, and the prepare runs at 2-4 warps. The output and local-dv kernels loop over V inside one
program per (chunk, value head), so that Q K^T is computed once per chunk."""

import importlib.util
import os

import pytest

pytest.importorskip("triton.backends.nvidia")

_REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "sm90_report.py")


def _load_report():
    spec = importlib.util.spec_from_file_location("sm90_report", _REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sm90():
    from triton.runtime.jit import JITFunction

    module = _load_report()
    if not any(isinstance(x, JITFunction) for x in vars(module.triton_chunk).values()):
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1: nothing to compile")
    return module


@pytest.fixture(scope="module")
def state_walks(sm90):
    rows = sm90.report(kernel_filter=lambda name, is_state_walk: is_state_walk)
    # forward (chunk states h) and backward (their gradients dh): at least one walk each way
    assert len({row["kernel"] for row in rows}) >= 2, rows
    return rows


def test_state_walks_do_not_spill(sm90, state_walks):
    for row in state_walks:
        assert row["spill_stores"] <= sm90.MAX_STATE_WALK_SPILL_BYTES, row


def test_state_walks_prefetch(state_walks):
    for row in state_walks:
        assert row["prefetch"] != "none", row


def test_state_walks_split_v(sm90, state_walks):
    for row in state_walks:
        for docs, programs in row["programs"].items():
            assert programs >= 4 * docs * sm90.HV, row


SPILL_FREE_CHUNK_KERNELS = {"_prepare_kernel", "_wu_kernel", "_output_kernel", "_local_dv_kernel", "_wy_bwd_kernel",
                            "_qk_bwd_kernel"}


@pytest.fixture(scope="module")
def spill_free_chunk_kernels(sm90):
    rows = sm90.report(kernel_filter=lambda name, is_state_walk: name in SPILL_FREE_CHUNK_KERNELS)
    assert {row["kernel"] for row in rows} == SPILL_FREE_CHUNK_KERNELS, rows
    return rows


def test_chunk_parallel_kernels_do_not_spill(spill_free_chunk_kernels):
    for row in spill_free_chunk_kernels:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0), row


def test_prepare_runs_at_2_to_4_warps(spill_free_chunk_kernels):
    warps = {row["kernel"]: row["num_warps"] for row in spill_free_chunk_kernels}
    assert 2 <= warps["_prepare_kernel"] <= 4, warps


def test_output_and_local_dv_compute_qk_once_per_chunk(sm90, spill_free_chunk_kernels):
    # One program per (chunk, value head): the V blocks are a loop inside it, not a grid axis.
    for row in spill_free_chunk_kernels:
        if row["kernel"] in ("_output_kernel", "_local_dv_kernel"):
            for docs, grid in row["grid"].items():
                assert grid[1:] == (sm90.HV,), row


def test_state_walks_are_found_by_their_program_count(sm90):
    # The classification the two tests rely on: a walk's programs do not grow with the tokens, others' do.
    launches = sm90.training_launches(1)
    walks = sm90.state_walks([launches], sm90.training_launches(1, 2 * sm90.DOC_TOKENS))
    assert walks and walks < {launch.name for launch in launches}
