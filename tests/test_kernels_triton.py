"""Triton gated delta rule kernels under the Triton interpreter (CPU), against the float64 oracle.

CPU tensors with backend="triton" run the kernels interpreted: `kernels.gated_delta_rule.ops` loads its own
interpreted copy of the Triton modules (TRITON_INTERPRET=1 while they are decorated), so these tests need no
environment setup and work in any order with the rest of the suite. Shapes are tiny: the interpreter runs each
program in numpy, about a second per forward + backward here. GPU code generation, which the interpreter does not
exercise, is checked by compiling every kernel for sm_90 (no GPU needed).
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
import qwen35
from delta_rule_oracle import naive_gated_delta_rule_f64
from kernels.gated_delta_rule import ops
from tiny_configs import TINY_CONFIGS

# (name, B, lengths (None = fixed length T of each batch row), T, H, HV, K, V, initial state, final state, l2norm)
CASES = [
    # T not a multiple of 64, two batch rows, grouped value heads, V > K.
    ("fixed_T100_gva", 2, None, 100, 1, 2, 16, 32, False, True, False),
    # Packed sequences of odd lengths, grouped value heads, initial state, in-kernel L2 norm.
    ("varlen_gva_h0_l2norm", 1, [37, 65, 9], None, 2, 4, 16, 16, True, True, True),
    # A 1-token and an empty sequence, chunk-boundary lengths 63 / 65, initial state, no L2 norm.
    ("varlen_edges_h0", 1, [1, 0, 63, 65], None, 2, 2, 16, 16, True, True, False),
    # K and V not powers of two, V = 80 in three V blocks (the last one partial), one exact chunk, no final state.
    ("fixed_T64_odd_dims", 1, None, 64, 1, 2, 24, 80, False, False, True),
]


def _inputs(B, lengths, T, H, HV, K, V, with_h0, l2norm, dtype=torch.float32, seed=0, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    cu_seqlens = None
    if lengths is not None:
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        T = sum(lengths)
    N = B if lengths is None else len(lengths)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        # Unit keys keep the delta rule contractive (I - beta k k^T) when the kernel does not normalise them.
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2) * decay_scale
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(N, HV, K, V, generator=gen) if with_h0 else None
    return (q.to(dtype), k.to(dtype), v.to(dtype), g, beta), h0, cu_seqlens


def _run_with_grads(fn, tensors, h0, output_final_state, seed=1):
    """fn(q, k, v, g, beta, h0) -> (o, final or None); returns o, final and the gradients of
    <o, do> + <final, dfinal> w.r.t. q, k, v, g, beta (and h0 when given), for fixed random do, dfinal."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    h0_leaf = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, final = fn(*leaves, h0_leaf)
    gen = torch.Generator().manual_seed(seed)
    outputs, grads_out = [o], [torch.randn(o.shape, generator=gen).to(o.device, o.dtype)]
    if output_final_state:
        outputs.append(final)
        grads_out.append(torch.randn(final.shape, generator=gen).to(final.device, final.dtype))
    wrt = leaves + ([h0_leaf] if h0_leaf is not None else [])
    grads = torch.autograd.grad(outputs, wrt, grads_out)
    return o.detach(), (final.detach() if output_final_state else None), grads


def _ours_and_oracle(case, backend, dtype, device="cpu", decay_scale=1.0):
    """Our op on `device` and the float64 oracle on the CPU, from the same inputs: two (o, final, gradients)."""
    _, B, lengths, T, H, HV, K, V, with_h0, with_final, l2norm = case
    tensors, h0, cu_seqlens = _inputs(B, lengths, T, H, HV, K, V, with_h0, l2norm, dtype, decay_scale=decay_scale)
    device_cu = cu_seqlens.to(device) if cu_seqlens is not None else None

    def ours(q, k, v, g, beta, h0):
        o, final = ops.chunk_gated_delta_rule_op(
            *(x.to(device) for x in (q, k, v, g, beta)), initial_state=h0.to(device) if h0 is not None else None,
            output_final_state=with_final, cu_seqlens=device_cu, use_qk_l2norm=l2norm, backend=backend)
        return o.cpu(), final.cpu() if final is not None else None

    def oracle(q, k, v, g, beta, h0):
        return naive_gated_delta_rule_f64(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu_seqlens,
                                          use_qk_l2norm=l2norm)

    return (_run_with_grads(ours, tensors, h0, with_final),
            _run_with_grads(oracle, [x.double() for x in tensors], h0.double() if h0 is not None else None,
                            with_final))


def _compare(case, backend, dtype, atol_out, atol_grad, device="cpu", decay_scale=1.0):
    with_final = case[9]
    (o, final, grads), (ref_o, ref_final, ref_grads) = _ours_and_oracle(case, backend, dtype, device, decay_scale)
    assert o.dtype == dtype and o.shape == ref_o.shape
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=atol_out)
    if with_final:
        assert final.dtype == torch.float32
        torch.testing.assert_close(final.double(), ref_final, rtol=0, atol=atol_out)
    else:
        assert final is None
    names = ["dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, grad, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=atol_grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_chunk_fp32_matches_oracle(case):
    _compare(case, "triton", torch.float32, atol_out=1e-5, atol_grad=1e-4)


def test_state_walks_at_32_wide_v_blocks(monkeypatch):
    """The state walks take V blocks of 16 when their grid would be small (every shape the interpreter can afford)
    and of 32 otherwise: the 32-wide walks (three V blocks at V = 80, the last partial; K = 24 in one state tile),
    forced here, against the oracle."""
    from kernels.gated_delta_rule import triton_chunk

    assert triton_chunk._walk_block_sizes(1, 16, 128, 128) == (64, 16)  # 64 programs at 32: too few
    assert triton_chunk._walk_block_sizes(8, 16, 128, 128) == (64, 32)
    assert triton_chunk._walk_block_sizes(1, 2, 24, 80) == (32, 16)
    monkeypatch.setattr(ops._triton_module("triton_chunk", torch.device("cpu")), "_WALK_MIN_PROGRAMS", 0)
    _compare(CASES[3], "triton", torch.float32, atol_out=1e-5, atol_grad=1e-4)


def test_triton_chunk_refuses_head_sizes_over_256():
    (q, k, v, g, beta), _, _ = _inputs(1, None, 4, 1, 1, 257, 16, False, False)
    with pytest.raises(ValueError, match="head sizes K <= 256, got K=257"):
        ops.chunk_gated_delta_rule_op(q, k, v, g, beta, backend="triton")


# Sequences ending inside a chunk, no final state, and a decay ~30x the other cases' (log decay about -4 per
# token, as fast heads of trained models and of the model's A_log init have): gamma within a chunk passes -88,
# where exp(-gamma) overflows fp32. The backward once turned the rows past a sequence's end into 0 * inf = NaN.
FAST_DECAY_CASE = ("varlen_fast_decay", 1, [70, 1, 57], None, 1, 2, 16, 16, False, False, True)


def test_triton_chunk_fast_decay_matches_oracle():
    _compare(FAST_DECAY_CASE, "triton", torch.float32, atol_out=1e-5, atol_grad=1e-4, decay_scale=30.0)


def test_rows_after_last_sequence_get_zero_output_and_gradients(monkeypatch):
    """A packed row whose cu_seqlens end before T (the unused end of a packed batch): the Triton kernels write
    zeros there for o and every gradient (never uninitialised memory) and match the oracle on the packed rows;
    the torch path, which reads cu_seqlens on the host, refuses such input. The output and local-dv programs
    loop over V blocks: forced to 16-wide blocks here, so that they run that loop twice (V = 32), tail included."""
    (q, k, v, g, beta), _, _ = _inputs(1, None, 150, 1, 2, 16, 32, False, True)
    cu_seqlens = torch.tensor([0, 37, 70], dtype=torch.int32)  # rows 70..149: two tail chunks, one partial
    end = int(cu_seqlens[-1])
    h0 = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(2))
    interpreted = ops._triton_module("triton_chunk", torch.device("cpu"))
    monkeypatch.setitem(interpreted._WIDE_BV, "output", 16)
    monkeypatch.setitem(interpreted._WIDE_BV, "local_dv", 16)

    def ours(q, k, v, g, beta, h0):
        return ops.chunk_gated_delta_rule_op(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                             cu_seqlens=cu_seqlens, use_qk_l2norm=True, backend="triton")

    def oracle_on_packed_rows(q, k, v, g, beta, h0):
        o, final = naive_gated_delta_rule_f64(*(x[:, :end] for x in (q, k, v, g, beta)), initial_state=h0,
                                              cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        return F.pad(o, (0, 0, 0, 0, 0, q.shape[1] - end)), final

    tensors = (q, k, v, g, beta)
    o, final, grads = _run_with_grads(ours, tensors, h0, True)
    ref_o, ref_final, ref_grads = _run_with_grads(oracle_on_packed_rows, [x.double() for x in tensors],
                                                  h0.double(), True)
    assert torch.equal(o[:, end:], torch.zeros_like(o[:, end:]))
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=0, atol=1e-5)
    for name, grad, ref in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, ref_grads):
        if name != "dh0":
            assert torch.equal(grad[:, end:], torch.zeros_like(grad[:, end:])), name
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing from 0 to T=150"):
        ops.chunk_gated_delta_rule_op(q, k, v, g, beta, cu_seqlens=cu_seqlens, backend="torch")
    o_recurrent, _ = ops.recurrent_gated_delta_rule_op(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu_seqlens,
                                                       use_qk_l2norm=True, backend="triton")
    torch.testing.assert_close(o_recurrent.double(), ref_o, rtol=0, atol=1e-5)  # zeros after the end included


class _LaunchRecorder:
    """Stands in for a Triton kernel: records the grid of each launch and runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append((self.name, grid))


def test_launch_grids_keep_axes_1_and_2_within_cuda_limits(monkeypatch):
    """5,000 packed documents x 16 value heads (forward and backward) and a decode batch of 5,000 rows: only grid
    axis 0 may pass 65,535 programs on CUDA. The interpreter does not enforce that limit (and would take hours
    over these grids), so the launches are recorded, not run; the kernels' indexing from axis 0 is what every
    other test here exercises, and tests/test_cuda.py runs this shape on a GPU."""
    from kernels.gated_delta_rule import triton_chunk, triton_recurrent

    grids = []
    for module in (triton_chunk, triton_recurrent):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _LaunchRecorder(name, grids))
    docs, HV = 5000, 16
    (q, k, v, g, beta), _, cu_seqlens = _inputs(1, [3] * docs, None, 1, HV, 16, 16, False, False)
    _, _, residuals = triton_chunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, cu_seqlens=cu_seqlens)
    triton_chunk.chunk_gated_delta_rule_bwd(torch.randn_like(v), None, q, k, v, g, beta, residuals,
                                            cu_seqlens=cu_seqlens)
    decode = [x[:, :docs].reshape(docs, 1, *x.shape[2:]) for x in (q, k, v, g, beta)]
    triton_recurrent.recurrent_gated_delta_rule_fwd(*decode)
    assert {name for name, _ in grids} == {name for name in dir(triton_chunk) if name.endswith("_kernel")} | {
        "_recurrent_kernel"}
    assert all(grid[0] >= docs and all(n <= 65535 for n in grid[1:]) for _, grid in grids), grids
    with pytest.raises(ValueError, match="only axis 0 may have more than 65535 programs"):
        triton_chunk.launch_grid(4, 65536)


def test_triton_chunk_fp16_matches_oracle():
    # fp16 q/k/v (g, beta fp32): the matmuls take fp16 operands, intermediates are stored in fp16.
    _compare(CASES[1], "triton", torch.float16, atol_out=5e-3, atol_grad=3e-2)


def test_torch_backend_through_op_matches_oracle():
    # The CPU implementation of the ops: reference forward, and its vjp recomputed inside the backward op.
    _compare(CASES[1], "torch", torch.float32, atol_out=1e-5, atol_grad=1e-4)


def test_triton_recurrent_matches_oracle_and_updates_state_in_place():
    # Decoding-shaped batch: two 1-token sequences and a 5-token one, grouped value heads, L2 norm.
    (q, k, v, g, beta), h0, cu_seqlens = _inputs(1, [1, 5, 1], None, 2, 4, 16, 32, True, True)
    ref_o, ref_final = naive_gated_delta_rule_f64(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu_seqlens,
                                                  use_qk_l2norm=True)
    o, final = ops.recurrent_gated_delta_rule_op(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 cu_seqlens=cu_seqlens, use_qk_l2norm=True, backend="triton")
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=0, atol=1e-5)

    state = h0.clone()
    o_inplace = ops.recurrent_gated_delta_rule_inplace(q, k, v, g, beta, state, cu_seqlens=cu_seqlens,
                                                       use_qk_l2norm=True, backend="triton")
    torch.testing.assert_close(o_inplace, o, rtol=0, atol=0)
    torch.testing.assert_close(state, final, rtol=0, atol=0)


def _opcheck_args():
    (q, k, v, g, beta), h0, cu_seqlens = _inputs(1, [5, 11], None, 1, 2, 16, 16, True, True)
    return q, k, v, g, beta, h0, cu_seqlens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_chunk_ops(backend):
    q, k, v, g, beta, h0, cu_seqlens = _opcheck_args()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    torch.library.opcheck(torch.ops.qwen35.chunk_gated_delta_rule_fwd,
                          (*leaves, 0.25, h0.clone().requires_grad_(), True, cu_seqlens, True, backend))
    do = torch.randn_like(v)
    dht = torch.randn_like(h0)
    for initial_state, l2norm, grad_final in ((h0, True, dht), (None, False, None)):
        _, _, residuals = torch.ops.qwen35.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 0.25, initial_state, True,
                                                                      cu_seqlens, l2norm, backend)
        torch.library.opcheck(torch.ops.qwen35.chunk_gated_delta_rule_bwd,
                              (do, grad_final, q, k, v, g, beta, 0.25, initial_state, cu_seqlens, l2norm, backend,
                               residuals))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_recurrent_ops(backend):
    q, k, v, g, beta, h0, cu_seqlens = _opcheck_args()
    torch.library.opcheck(torch.ops.qwen35.recurrent_gated_delta_rule,
                          (q, k, v, g, beta, 0.25, h0, True, cu_seqlens, True, backend))
    torch.library.opcheck(torch.ops.qwen35.recurrent_gated_delta_rule_,
                          (q, k, v, g, beta, h0.clone(), 0.25, cu_seqlens, True, backend))


def test_op_compiles_fullgraph_without_breaks():
    (q, k, v, g, beta), h0, _ = _inputs(1, None, 70, 1, 2, 16, 16, True, True)

    def loss_fn(q, k, v, g, beta, h0):
        o, final = ops.chunk_gated_delta_rule_op(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 use_qk_l2norm=True)
        return o.square().sum() + final.sin().sum()

    explanation = torch._dynamo.explain(loss_fn)(q, k, v, g, beta, h0)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0

    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    compiled_inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    loss_fn(*inputs).backward()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled_inputs).backward()
    for eager, compiled in zip(inputs, compiled_inputs):
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-5, atol=1e-6)


# Pointer arguments that are not in the input dtype.
_FP32_POINTERS = {"g_ptr", "gcum_ptr", "h0_ptr", "ht_ptr", "dht_ptr", "dh0_ptr", "dq_ptr", "dk_ptr",
                  "dg_ptr", "dbeta_ptr", "dgam_ptr"}
_INT32_POINTERS = {"cu_ptr", "chunks_ptr", "chunk_offsets_ptr"}


# The optional-state pointers (HAS_H0, STORE_HT, HAS_DHT, STORE_DH0), None (a constexpr) when their flag is off.
_OPTIONAL_POINTERS = ("h0_ptr", "ht_ptr", "dht_ptr", "dh0_ptr")


@pytest.mark.parametrize("features", [True, False], ids=["all_features", "no_optional_state_no_l2norm"])
def test_kernels_compile_for_sm90(features):
    """The interpreter runs kernels as numpy and cannot catch GPU code generation errors; compile every kernel
    for sm_90 (bf16, K = V = 128) through Triton's own backend, which needs no GPU: with every feature on, and
    with no initial / final state (their pointers None) and no in-kernel L2 norm."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kernels.gated_delta_rule import triton_chunk, triton_recurrent

    if not isinstance(triton_chunk._prepare_kernel, JITFunction):
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1: nothing to compile")

    BK = triton_chunk._block_k(128)
    BKB, BV = triton_chunk._walk_block_sizes(1, 32, 128, 128)
    flags = dict(H=16, HV=32, K=128, V=128, BT=64, BC=16, BK=BK, BKB=BKB, BV=BV, BW=triton_chunk._WU_BLOCK,
                 L2NORM=features, PREC="tf32", HAS_H0=features, STORE_HT=features, HAS_DHT=features,
                 STORE_DH0=features)
    if not features:
        flags.update({pointer: None for pointer in _OPTIONAL_POINTERS})
    kernels = [getattr(triton_chunk, name) for name in dir(triton_chunk) if name.endswith("_kernel")]
    kernels.append(triton_recurrent._recurrent_kernel)
    wide_v_blocks = {triton_chunk._output_kernel: "output", triton_chunk._local_dv_kernel: "local_dv",
                     triton_chunk._wy_bwd_kernel: "wy_bwd", triton_chunk._qk_bwd_kernel: "qk_bwd"}
    for kernel in kernels:
        kernel_flags = dict(flags, BV=triton_chunk._wide_block_v(wide_v_blocks[kernel], 128)) \
            if kernel in wide_v_blocks else flags
        constexprs = {name: kernel_flags[name] for name in kernel.arg_names if name in kernel_flags}
        signature = {name: "constexpr" if name in constexprs else
                     "fp32" if name == "scale" else
                     "*fp32" if name in _FP32_POINTERS else
                     "*i32" if name in _INT32_POINTERS else "*bf16" for name in kernel.arg_names}
        source = ASTSource(kernel, signature,
                           constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "enable_fp_fusion": True})
        assert compiled.asm["cubin"], kernel.__name__


def test_triton_chunk_support_rule():
    # 16-bit CUDA inputs need head sizes >= 32 (smaller ones fault on Hopper; tests/test_cuda.py); fp32 and the
    # CPU interpreter take every size.
    assert ops.triton_chunk_supported("cuda", torch.bfloat16, 128, 128)
    assert ops.triton_chunk_supported("cuda", torch.float16, 32, 64)
    assert not ops.triton_chunk_supported("cuda", torch.bfloat16, 16, 128)
    assert not ops.triton_chunk_supported("cuda", torch.float16, 64, 16)
    assert ops.triton_chunk_supported("cuda", torch.float32, 16, 16)
    assert ops.triton_chunk_supported("cpu", torch.bfloat16, 16, 16)


def loss_and_grads(model, ids, cu_seqlens):
    """Logits of a packed row and the parameter gradients of its next-token loss (on the CPU)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, cu_seqlens=cu_seqlens)
    F.cross_entropy(logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten()).backward()
    return logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def packed_batch(vocab, lengths, device):
    """A random row of documents of `lengths` tokens and its cu_seqlens."""
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(0)).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return ids, cu


def test_model_through_triton_kernels_matches_reference(monkeypatch):
    """A packed fp32 forward + backward of a tiny model with its delta rule forced onto the (interpreted) Triton
    kernels equals the model on the torch reference: model-initialised decays (fast heads included) and
    sequences ending inside chunks, as `tests/test_cuda.py` checks for the compiled kernels on a GPU."""
    config = TINY_CONFIGS["dense_untied_gqa2_hv2x"]
    torch.manual_seed(0)
    reference_model = qwen35.Qwen35ForCausalLM(config)
    triton_model = qwen35.Qwen35ForCausalLM(config)
    triton_model.load_state_dict(reference_model.state_dict())
    batch = packed_batch(config.vocab_size, [70, 1, 59], "cpu")
    ref_logits, ref_grads = loss_and_grads(reference_model, *batch)
    chunk_rule = kernels.chunk_gated_delta_rule
    monkeypatch.setattr(kernels, "chunk_gated_delta_rule",
                        lambda *args, **kwargs: chunk_rule(*args, **kwargs, backend="triton"))
    logits, grads = loss_and_grads(triton_model, *batch)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
