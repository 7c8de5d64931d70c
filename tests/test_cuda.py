"""GPU checks: the compiled Triton kernels and the model on CUDA against the CPU oracles.

CI has no GPU, so every test here is skipped there (and reported as skipped); `bench/gpu_session.sh` runs this
file on the lent GPU machine before the benchmarks. The CPU suite covers the same kernels under the Triton
interpreter; what only a GPU shows is code generation, tensor-core precision and launch limits.
"""

import dataclasses

import pytest
import torch

import qwen35
from delta_rule_oracle import naive_gated_delta_rule_f64
from kernels.gated_delta_rule import ops
from parallelism import ParallelDims, ParallelizeSettings, parallelize
from test_kernels_triton import (CASES, FAST_DECAY_CASE, _compare, _inputs, _ours_and_oracle, _run_with_grads,
                                 loss_and_grads, packed_batch)
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_session.sh)")
CUDA = "cuda"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_chunk_fp32_cuda_matches_oracle(case):
    # fp32 inputs take IEEE fp32 matmuls in the kernels, so the CPU interpreter's tolerances hold.
    _compare(case, "triton", torch.float32, atol_out=1e-5, atol_grad=1e-4, device=CUDA)


def test_triton_chunk_fast_decay_cuda_matches_oracle():
    _compare(FAST_DECAY_CASE, "triton", torch.float32, atol_out=1e-5, atol_grad=1e-4, device=CUDA, decay_scale=30.0)


def test_triton_recurrent_cuda_matches_oracle():
    (q, k, v, g, beta), h0, cu_seqlens = _inputs(1, [1, 5, 1], None, 2, 4, 16, 32, True, True)
    ref_o, ref_final = naive_gated_delta_rule_f64(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu_seqlens,
                                                  use_qk_l2norm=True)
    o, final = ops.recurrent_gated_delta_rule_op(*(x.to(CUDA) for x in (q, k, v, g, beta)),
                                                 initial_state=h0.to(CUDA), output_final_state=True,
                                                 cu_seqlens=cu_seqlens.to(CUDA), use_qk_l2norm=True)
    torch.testing.assert_close(o.cpu().double(), ref_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.cpu().double(), ref_final, rtol=0, atol=1e-5)


def _rms_error_ratio(x, ref):
    """fla's metric (tests/ops/test_gdn.py, get_err_ratio): RMS of the error over the RMS of the reference."""
    return ((x.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-30)).item()


# fla's tolerances for the chunk rule in 16 bits against a full-precision recurrence.
FLA_TOLERANCES = dict(o=0.005, final=0.005, dq=0.008, dk=0.008, dv=0.008, dh0=0.008, dbeta=0.02, dg=0.02)

# (name, lengths of the packed documents, H, HV, K = V, scale, log-decay multiplier, fraction of zeroed gates)
FLA_MATRIX_CASES = [
    ("mid_chunk_ends_k128", [130, 64, 93], 2, 4, 128, None, 1.0, 0.0),
    ("mid_chunk_ends_k64", [75, 1, 63, 161], 2, 4, 64, None, 1.0, 0.5),
    # Log decay down to about -70 per token (fla's extreme gate normaliser): gamma passes -88 within a chunk.
    ("extreme_decay_k128", [100, 37], 1, 2, 128, None, 30.0, 0.0),
    ("extreme_decay_k64", [65, 70], 2, 2, 64, None, 30.0, 0.5),
    # scale = 1: how fla PR #1262 caught ptxas 12.8 / 13.0 miscompiling the Hopper state backward.
    ("scale_1_k128_no_decay", [200], 1, 1, 128, 1.0, 1.0, 1.0),
    ("scale_1_k64", [64, 136], 1, 4, 64, 1.0, 1.0, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", FLA_MATRIX_CASES, ids=[c[0] for c in FLA_MATRIX_CASES])
def test_triton_chunk_16bit_cuda_meets_fla_tolerances(case, dtype):
    """16-bit inputs on tensor cores against the float64 recurrence, with fla's metric and tolerances: initial and
    final states, in-kernel L2 norm, grouped value heads, packed documents ending inside chunks."""
    _check_fla_tolerances(case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [FLA_MATRIX_CASES[0], FLA_MATRIX_CASES[4]], ids=lambda c: c[0])
def test_triton_chunk_16bit_cuda_32_wide_walks_meet_fla_tolerances(case, dtype, monkeypatch):
    """As above with the state walks at V blocks of 32, which they take on grids of >= 128 programs (these small
    cases would get 16)."""
    from kernels.gated_delta_rule import triton_chunk

    monkeypatch.setattr(triton_chunk, "_WALK_MIN_PROGRAMS", 0)
    _check_fla_tolerances(case, dtype)


def _check_fla_tolerances(case, dtype):
    _, lengths, H, HV, D, scale, decay_scale, zero_gates = case
    (q, k, v, g, beta), _, cu_seqlens = _inputs(1, lengths, None, H, HV, D, D, False, True, dtype,
                                                decay_scale=decay_scale)
    gen = torch.Generator().manual_seed(3)
    g = torch.where(torch.rand(g.shape, generator=gen) < zero_gates, torch.zeros_like(g), g)
    h0 = torch.randn(len(lengths), HV, D, D, generator=gen)
    tensors = (q, k, v, g, beta)

    def ours(q, k, v, g, beta, h0):
        o, final = ops.chunk_gated_delta_rule_op(*(x.to(CUDA) for x in (q, k, v, g, beta)), scale=scale,
                                                 initial_state=h0.to(CUDA), output_final_state=True,
                                                 cu_seqlens=cu_seqlens.to(CUDA), use_qk_l2norm=True,
                                                 backend="triton")
        return o.cpu(), final.cpu()

    def oracle(q, k, v, g, beta, h0):
        return naive_gated_delta_rule_f64(q, k, v, g, beta, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens,
                                          use_qk_l2norm=True)

    o, final, grads = _run_with_grads(ours, tensors, h0, True)
    ref_o, ref_final, ref_grads = _run_with_grads(oracle, [x.double() for x in tensors], h0.double(), True)
    errors = {"o": _rms_error_ratio(o, ref_o), "final": _rms_error_ratio(final, ref_final)}
    errors.update({name: _rms_error_ratio(grad, ref) for name, grad, ref in
                   zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, ref_grads)})
    assert all(errors[name] <= tol for name, tol in FLA_TOLERANCES.items()), errors


def test_triton_more_than_65535_programs_cuda_matches_reference():
    """5,000 packed documents x 16 value heads (forward and backward: the state walks launch 80,000 programs) and a
    decode batch of 5,000 rows: only grid axis 0 may pass 65,535 programs. Against the torch reference in float64
    on the same device (the float64 loop oracle would take minutes at this size)."""
    docs, HV = 5000, 16
    (q, k, v, g, beta), _, cu_seqlens = _inputs(1, [3] * docs, None, 4, HV, 32, 32, False, True, torch.float32)
    tensors = [x.to(CUDA) for x in (q, k, v, g, beta)]
    cu_seqlens = cu_seqlens.to(CUDA)

    def ours(q, k, v, g, beta, h0):
        return ops.chunk_gated_delta_rule_op(q, k, v, g, beta, output_final_state=True, cu_seqlens=cu_seqlens,
                                             use_qk_l2norm=True, backend="triton")

    def reference(q, k, v, g, beta, h0):
        return ops.chunk_gated_delta_rule_op(q, k, v, g, beta, output_final_state=True, cu_seqlens=cu_seqlens,
                                             use_qk_l2norm=True, backend="torch")

    o, final, grads = _run_with_grads(ours, tensors, None, True)
    ref_o, ref_final, ref_grads = _run_with_grads(reference, [x.double() for x in tensors], None, True)
    for name, x, ref in zip(["o", "final", "dq", "dk", "dv", "dg", "dbeta"], [o, final, *grads],
                            [ref_o, ref_final, *ref_grads]):
        torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")

    decode = [x[:, :docs].reshape(docs, 1, *x.shape[2:]) for x in tensors]
    state = torch.randn(docs, HV, 32, 32, device=CUDA)
    o, final = ops.recurrent_gated_delta_rule_op(*decode, initial_state=state, output_final_state=True,
                                                 use_qk_l2norm=True, backend="triton")
    ref_o, ref_final = ops.recurrent_gated_delta_rule_op(*(x.double() for x in decode), initial_state=state.double(),
                                                         output_final_state=True, use_qk_l2norm=True, backend="torch")
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=0, atol=1e-5)


# A compiled fp32 MoE block is not among them: torch._grouped_mm's fake kernel takes bf16 only (README caveat).
@pytest.mark.parametrize("name, compiled", [("dense_untied_gqa2_hv2x", False), ("dense_untied_gqa2_hv2x", True),
                                            ("moe_tied_hv2x", False)])
def test_model_cuda_matches_cpu(name, compiled):
    """Packed fp32 forward + backward: CUDA (Triton delta rule, eager or compiled per block with inductor) equals
    the CPU model (torch reference delta rule) from the same weights."""
    config = TINY_CONFIGS[name]
    torch.manual_seed(0)
    cpu_model = qwen35.Qwen35ForCausalLM(config)
    cuda_model = qwen35.Qwen35ForCausalLM(config).to(CUDA)
    cuda_model.load_state_dict(cpu_model.state_dict())
    if compiled:
        parallelize(cuda_model, ParallelDims(world_size=1), None, ParallelizeSettings(compile=True))
    lengths = [70, 1, 129, 56]
    ref_logits, ref_grads = loss_and_grads(cpu_model, *packed_batch(config.vocab_size, lengths, "cpu"))
    logits, grads = loss_and_grads(cuda_model, *packed_batch(config.vocab_size, lengths, CUDA))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n, ref in ref_grads.items():
        torch.testing.assert_close(grads[n], ref, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_greedy_decoding_cuda_matches_cpu(speculative):
    """Compiled decode steps (the default on CUDA: each decoder layer a CUDA graph) on a left-padded batch give CPU's
    eager greedy tokens, with and without MTP speculation (a two-token recorded verification step per draft)."""
    config = TINY_CONFIGS["dense_tied_gqa4_hv1x"]
    if speculative:
        config = dataclasses.replace(config, mtp_num_hidden_layers=1)
    torch.manual_seed(0)
    cpu_model = qwen35.Qwen35ForCausalLM(config).eval()
    cuda_model = qwen35.Qwen35ForCausalLM(config).to(CUDA).eval()
    cuda_model.load_state_dict(cpu_model.state_dict())
    prompt = torch.randint(2, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = qwen35.generate(cpu_model, prompt, max_new_tokens=12, padding_mask=mask, compile=False)
        out = qwen35.generate(cuda_model, prompt.to(CUDA), max_new_tokens=12, padding_mask=mask.to(CUDA),
                              speculative=speculative)
    assert torch.equal(out.cpu(), ref)


# Qwen3.5's head size (128), then smaller ones down to 32, the least the Triton path takes for 16-bit inputs.
# Last in the file: a kernel fault on the GPU poisons the process's CUDA context for every later test.
BF16_CASES = [("varlen_d128_gva_h0_l2norm", 1, [130, 64, 93], None, 2, 4, 128, 128, True, True, True),
              ("varlen_d32_gva_h0_l2norm", 1, [37, 65, 9], None, 2, 4, 32, 32, True, True, True),
              ("fixed_T100_d32x64_gva", 2, None, 100, 1, 2, 32, 64, False, True, False)]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_triton_chunk_bf16_cuda_matches_oracle(case, backend="triton"):
    """bf16 q/k/v (the training dtype) on tensor cores: relative L2 error of output and every gradient against
    float64, bounded by a few bf16 roundings (2^-8 = 3.9e-3 each)."""
    (o, final, grads), (ref_o, ref_final, ref_grads) = _ours_and_oracle(case, backend, torch.bfloat16, CUDA)
    pairs = [("o", o, ref_o)] + list(zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, ref_grads))
    if final is not None:
        pairs.append(("final", final, ref_final))
    for name, ours_x, ref in pairs:
        rel = ((ours_x.double() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, f"{name}: relative L2 error {rel:.2e}"


def test_small_16bit_heads_take_the_torch_path_on_cuda():
    """Head size 16 in bf16 faults in the Triton backward on Hopper: backend=None runs the torch path (still matching
    the oracle) and "triton" refuses with the reason."""
    test_triton_chunk_bf16_cuda_matches_oracle(CASES[1], backend=None)
    (q, k, v, g, beta), _, _ = _inputs(1, None, 64, 1, 2, 16, 16, False, True, torch.bfloat16)
    with pytest.raises(ValueError, match="head sizes K=16, V=16"):
        ops.chunk_gated_delta_rule_op(*(x.to(CUDA) for x in (q, k, v, g, beta)), backend="triton")
