"""Token-by-token gated delta rule in Triton, for decoding (T == 1) and short prompts. Forward only.

One program per (V block, sequence, value head) keeps its [K, BV] slice of the fp32 state in registers and walks
the sequence's tokens: S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (scale q_t).
The final state can be written over the initial state (in place): every program reads its own slice once,
before the loop, and writes that same slice after it.
"""

import torch
import triton
import triton.language as tl

from .triton_chunk import launch_grid

# Builtins instead of tl.sum / tl.zeros (themselves @triton.jit functions): see the note in triton_chunk.py.
_ADD = tl.standard._sum_combine


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, h0_ptr, ht_ptr, cu_ptr, scale,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr,
                      L2NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    # Sequences x value heads on axis 0, the only one allowed more than 65,535 programs (a decode batch of 5,000
    # rows x 16 heads); V blocks on axis 1.
    n = (tl.program_id(0) // HV).to(tl.int64)  # int64: state offsets can pass 2^31 with many sequences
    hv = tl.program_id(0) % HV
    vb = tl.program_id(1)
    h = hv // (HV // H)
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    rows_k = tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    mask_k = rows_k < K
    mask_v = cols_v < V
    state_ptrs = (n * HV + hv) * K * V + rows_k[:, None] * V + cols_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_H0:
        s = tl.load(h0_ptr + state_ptrs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.full([BK, BV], 0.0, tl.float32)
    for t in range(bos, eos):
        q = tl.load(q_ptr + (t * H + h) * K + rows_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (t * H + h) * K + rows_k, mask=mask_k, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.reduce(q * q, 0, _ADD) + 1e-6)
            k = k * tl.rsqrt(tl.reduce(k * k, 0, _ADD) + 1e-6)
        v = tl.load(v_ptr + (t * HV + hv) * V + cols_v, mask=mask_v, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * HV + hv).to(tl.float32)
        beta = tl.load(beta_ptr + t * HV + hv).to(tl.float32)
        s = s * tl.exp(g)
        delta = beta * (v - tl.reduce(k[:, None] * s, 0, _ADD))
        s += k[:, None] * delta[None, :]
        o = tl.reduce(s * (scale * q)[:, None], 0, _ADD)
        tl.store(o_ptr + (t * HV + hv) * V + cols_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)
    if STORE_HT:
        tl.store(ht_ptr + state_ptrs, s, mask=state_mask)


def recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                   cu_seqlens=None, use_qk_l2norm=False, inplace_state=False):
    """Shapes as `kernels.recurrent_gated_delta_rule`; returns (o [B, T, HV, V] in v's dtype, final state or None).

    inplace_state=True writes the final state into `initial_state` (fp32, contiguous) and returns it: a decode
    step then updates its cache without allocating.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of q/k heads ({H})")
    if cu_seqlens is None:
        cu = torch.arange(0, B + 1, dtype=torch.int32, device=q.device) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    N = cu.shape[0] - 1
    if inplace_state:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("inplace_state needs a contiguous fp32 initial_state")
        final = initial_state
    elif output_final_state:
        final = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device)
    else:
        final = None
    h0 = initial_state.contiguous() if initial_state is not None else None
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta)]
    # zeros: the rows after cu_seqlens[-1], which no program visits, are part of o
    o = (torch.empty if cu_seqlens is None else torch.zeros)(B * T, HV, V, dtype=v.dtype, device=v.device)
    BK = triton.next_power_of_2(K)
    BV = min(32, triton.next_power_of_2(V))
    _recurrent_kernel[launch_grid(N * HV, triton.cdiv(V, BV))](
        *flat, o, h0, final, cu, K ** -0.5 if scale is None else float(scale),
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, L2NORM=bool(use_qk_l2norm), HAS_H0=h0 is not None,
        STORE_HT=final is not None, num_warps=1 if BK * BV <= 2048 else 4)
    return o.view(B, T, HV, V), final
