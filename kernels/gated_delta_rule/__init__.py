"""Gated delta rule (Gated DeltaNet): one signature, several backends.

    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                            output_final_state=False, cu_seqlens=None,
                                            use_qk_l2norm=False, backend=None)

q, k [B, T, H, K]; v [B, T, HV, V]; g (log decay, <= 0) and beta [B, T, HV]; HV % H == 0 and value head j
uses q/k head j // (HV // H). scale defaults to K ** -0.5. initial_state / final_state [N, HV, K, V] fp32
(float64 for float64 inputs), N = B, or the number of sequences when cu_seqlens ([N + 1], int32/int64,
B == 1) packs several sequences whose states start from initial_state[n] and never mix. use_qk_l2norm
normalises q and k as x * rsqrt(sum(x^2) + 1e-6) (fp32) before scaling. o [B, T, HV, V] in v's dtype.

`recurrent_gated_delta_rule` takes the same arguments and steps token by token (decoding, small T).
backend: None picks by device (CUDA -> Triton, CPU -> the torch reference in `reference.py`); "torch" or
"triton" forces one (these three spellings only, here and in `ops`) (Triton on CPU tensors runs under the Triton interpreter: tests). Everything except eager
CPU calls goes through the `qwen35::` torch.library ops of `ops.py`, so torch.compile(fullgraph=True) sees one
opaque node and never breaks the graph.
"""

import functools

import torch

from .._checks import num_sequences
from . import ops, reference

def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, backend):
    ops.check_backend(backend)
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B={B}, T={T}, HV, V], got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if HV % H:
        raise ValueError(f"the number of value heads HV={HV} (v.shape[2]) must be a multiple of "
                         f"the number of q/k heads H={H} (q.shape[2])")
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != v.shape[:3]:
            raise ValueError(f"{name} must be [B, T, HV] = {tuple(v.shape[:3])}, got {tuple(x.shape)}")
    N = num_sequences(B, cu_seqlens)
    if initial_state is not None and initial_state.shape != (N, HV, K, V):
        raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)} (N = "
                         f"{'number of sequences in cu_seqlens' if cu_seqlens is not None else 'B'}), "
                         f"got {tuple(initial_state.shape)}")


def _eager_cpu_reference(q, backend) -> bool:
    """Eager CPU calls go straight to the reference, whose hand-written backward saves what it needs; the op
    boundary would make the backward recompute the forward. Compiled graphs and CUDA tensors use the op."""
    return backend in (None, "torch") and q.device.type == "cpu" and not torch.compiler.is_compiling()


def _dispatch(name, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
              backend):
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, backend)
    if _eager_cpu_reference(q, backend):
        impl = getattr(reference, name)
    else:
        impl = functools.partial(getattr(ops, f"{name}_op"), backend=backend)
    return impl(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False, backend=None):
    """Chunkwise-parallel gated delta rule (training, prefill). Returns (o, final_state or None)."""
    return _dispatch("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm, backend)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, backend=None):
    """Token-by-token gated delta rule (decoding, T == 1 or small T). Returns (o, final_state or None)."""
    return _dispatch("recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm, backend)


__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule"]
