"""Pure-torch gated delta rule: the CPU implementation and the oracle for the Triton kernels.

Recurrence per value head (state S is [K, V]):
    S_t = exp(g_t) S_{t-1};  S_t += k_t (outer) beta_t (v_t - S_t^T k_t);  o_t = S_t^T (scale q_t)

Inputs are assumed valid (the public functions in `kernels.gated_delta_rule` check them). Both functions
are differentiable (first order) w.r.t. q, k, v, g, beta and initial_state.
"""

import functools
import math

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def _without_autocast(fn):
    """Run fn with torch.autocast off for the device of its first tensor argument: the reference computes in its
    own dtype (fp32, or float64), which autocast would otherwise lower to 16 bits in every matmul, the state's
    included. The output still takes v's dtype, as without autocast."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return run


def _compute_dtype(*tensors):
    """fp32, or float64 when an input is float64 (half precision is promoted to fp32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm):
    """All inputs in the compute dtype (returned last); q, k L2-normalised if asked, q scaled."""
    dtype = _compute_dtype(q, k, v)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k, v, g, beta, dtype


def _sequence_bounds(cu_seqlens, total):
    """Host copies of the boundaries and the per-sequence lengths, checked."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={total}, got {bounds}")
    return bounds, [e - s for s, e in zip(bounds[:-1], bounds[1:])]


def _scatter_rows(x, index, rows):
    """Rows of x [T, ...] placed at `index` of a zero tensor [rows, ...] (differentiable)."""
    return x.new_zeros((rows, *x.shape[1:])).index_copy(0, index, x)


def _chunk_scan_input(q, k, v, g, beta):
    """[B, T, ...] -> chunk-major [NC, B, H, (1|G), C, ...], the sequence zero-padded to a multiple of C.

    Zero padding at the end of a sequence is exact: k = v = g = beta = 0 leaves the state unchanged.
    q/k keep a singleton group axis so that they broadcast over the HV / H value heads sharing them.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H
    C = CHUNK_SIZE
    NC = math.ceil(T / C)
    pad = NC * C - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    q, k = (x.reshape(B, NC, C, H, 1, K).permute(1, 0, 3, 4, 2, 5).contiguous() for x in (q, k))
    v = v.reshape(B, NC, C, H, G, V).permute(1, 0, 3, 4, 2, 5).contiguous()
    g, beta = (x.reshape(B, NC, C, H, G).permute(1, 0, 3, 4, 2).contiguous() for x in (g, beta))
    return q, k, v, g, beta


def _chunk_decays(gamma):
    """(exp(gamma_i), exp(gamma_C - gamma_i)): decay from the chunk start to token i, and from i to the chunk end."""
    return gamma.exp(), (gamma[..., -1:] - gamma).exp()


def _chunk_forward(q, k, v, g, beta, s0, seq_chunks):
    """Chunked (WY / UT) gated delta rule on the layout of `_chunk_scan_input`: (o, final states, residuals), the
    residuals being what its hand-written backward `_chunk_backward` reads (their shapes: `residual_shapes`).

    q, k [NC, B, H, 1, C, K]; v [NC, B, H, G, C, V]; g, beta [NC, B, H, G, C]; s0 [N, B, H, G, K, V].
    seq_chunks: (first, last) chunk range of each independent sequence n, whose state starts from s0[n].
    o is [NC, B, H, G, C, V] and the final states [N, B, H, G, K, V].

    Per chunk, with gamma = cumsum(g) and Gam[i, j] = exp(gamma_i - gamma_j) for j <= i (else 0):
        T = (I + strictLower(beta_i (K K^T)_ij Gam_ij))^-1,  W = T (beta exp(gamma) K),  U = T (beta V)
        v_new = U - W S                      (what the state does not already predict)
        O = (exp(gamma) Q) S + (Q K^T * Gam) v_new
        S' = exp(gamma_C) S + (exp(gamma_C - gamma) K)^T v_new
    Only the last line is sequential. The backward is written out (rather than left to autograd) so that it
    is a reverse scan of two matmuls per chunk plus batched matmuls, with no per-chunk autograd nodes.
    """
    NC, B, H, G, C, V = v.shape
    K = k.shape[-1]
    bhg = B * H * G
    gamma = g.cumsum(-1)  # log decay from the chunk start, inclusive
    e_in, e_out = _chunk_decays(gamma)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # Masked before exp so that j > i (positive exponents) cannot overflow.
    gam = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    kk = k @ k.mT  # shared by the G value heads of a q/k head
    qk = q @ k.mT
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(gam.shape)
    # unitriangular=True reads only the strict lower triangle.
    t = torch.linalg.solve_triangular(kk * gam * beta.unsqueeze(-1), eye, upper=False, unitriangular=True)
    w = t @ (k * (beta * e_in).unsqueeze(-1))
    u = t @ (v * beta.unsqueeze(-1))
    kd = k * e_out.unsqueeze(-1)

    decay = e_in[..., -1].reshape(NC, bhg, 1, 1)
    w3, u3, kd3 = w.view(NC, bhg, C, K), u.view(NC, bhg, C, V), kd.reshape(NC, bhg, C, K)
    states, v_new = q.new_empty(NC, bhg, K, V), q.new_empty(NC, bhg, C, V)
    s0 = s0.reshape(-1, bhg, K, V)
    finals = torch.empty_like(s0)
    for n, (first, last) in enumerate(seq_chunks):
        s = s0[n]
        if first == last:
            finals[n] = s
        else:
            states[first] = s
        for i in range(first, last):
            torch.baddbmm(u3[i], w3[i], s, alpha=-1, out=v_new[i])
            s = torch.baddbmm(s * decay[i], kd3[i].mT, v_new[i], out=states[i + 1] if i + 1 < last else finals[n])

    states6, v_new6 = states.view(NC, B, H, G, K, V), v_new.view(NC, B, H, G, C, V)
    a_qk = qk * gam
    o = (q * e_in.unsqueeze(-1)) @ states6 + a_qk @ v_new6
    return o, finals.view(-1, B, H, G, K, V), (gam, kk, a_qk, t, w, u, states6, v_new6)


@_without_autocast  # the backward of a forward that ran without it (a backward may run under autocast)
def _chunk_backward(q, k, v, g, beta, residuals, seq_chunks, d_o, d_finals):
    """Gradients (q, k, v, g, beta, s0) of `_chunk_forward` from its inputs and residuals, given those of
    (o, final states)."""
    gam, kk, a_qk, t, w, u, states, v_new = residuals
    e_in, e_out = _chunk_decays(g.cumsum(-1))
    NC, B, H, G, C, V = v.shape
    K = k.shape[-1]
    bhg = B * H * G
    group = (3,)  # the value-head group axis over which q/k are shared
    d_o = d_o.contiguous()  # it feeds three matmuls; it may arrive permuted or expanded (stride 0)

    # O = Qg S + Aqk v_new
    qg = q * e_in.unsqueeze(-1)
    d_qg = d_o @ states.mT
    d_states = (qg.mT @ d_o).view(NC, bhg, K, V)
    d_aqk = d_o @ v_new.mT
    d_vnew = (a_qk.mT @ d_o).view(NC, bhg, C, V)

    # Reverse scan. d_next[i] = dL/dS_{i+1} (the state after chunk i); d_vnew accumulates the state path.
    decay = e_in[..., -1].reshape(NC, bhg, 1, 1)
    w3 = w.view(NC, bhg, C, K)
    kd3 = (k * e_out.unsqueeze(-1)).reshape(NC, bhg, C, K)
    d_next = torch.empty_like(d_states)
    d_fin = d_finals.reshape(-1, bhg, K, V)
    d_s0 = torch.empty_like(d_fin)
    for n, (first, last) in enumerate(seq_chunks):
        if first == last:
            d_s0[n] = d_fin[n]
            continue
        d_next[last - 1] = d_fin[n]
        for i in range(last - 1, first - 1, -1):
            d_vnew[i].baddbmm_(kd3[i], d_next[i])
            torch.baddbmm(torch.addcmul(d_states[i], decay[i], d_next[i]), w3[i].mT, d_vnew[i], alpha=-1,
                          out=d_next[i - 1] if i > first else d_s0[n])

    d_vnew6, d_next6 = d_vnew.view(NC, B, H, G, C, V), d_next.view(NC, B, H, G, K, V)
    d_w = (d_vnew6 @ states.mT).neg_()
    d_kd = v_new @ d_next6.mT
    d_decay = (d_next6 * states).sum((-1, -2))  # dL/d exp(gamma_C)

    # W = T Kb, U = T Vb with Kb = beta exp(gamma) K, Vb = beta V
    d_kb = t.mT @ d_w
    d_vb = t.mT @ d_vnew6
    kdkb = (k * d_kb).sum(-1)
    d_beta = kdkb * e_in + (v * d_vb).sum(-1)
    d_v = d_vb * beta.unsqueeze(-1)
    d_ein = kdkb * beta + (q * d_qg).sum(-1)
    d_eout = (k * d_kd).sum(-1)

    # A = beta_i (K K^T)_ij Gam_ij (strict lower), T = (I + A)^-1. dL/dA = -T^T dL/dT T^T with
    # dL/dT = dW Kb^T + dU Vb^T, i.e. -(T^T dW)(T Kb)^T - (T^T dU)(T Vb)^T = -(dKb W^T + dVb U^T).
    d_a = torch.baddbmm(d_kb.view(-1, C, K) @ w.view(-1, C, K).mT, d_vb.view(-1, C, V), u.view(-1, C, V).mT,
                        beta=-1, alpha=-1)
    d_a.diagonal(dim1=-2, dim2=-1).zero_()  # A is strictly lower; above the diagonal Gam is 0 anyway
    d_a_gam = d_a.view(gam.shape) * gam
    y = d_a_gam * kk  # dL/dA * A / beta, without dividing by beta (which may be 0)
    d_beta = d_beta + y.sum(-1)
    d_kk = (d_a_gam * beta.unsqueeze(-1)).sum(group, keepdim=True)
    d_aqk_gam = d_aqk * gam
    d_qk = d_aqk_gam.sum(group, keepdim=True)
    d_log_gam = torch.addcmul(d_aqk * a_qk, y, beta.unsqueeze(-1))  # dL/dGam * Gam (Aqk = (Q K^T) Gam)

    q3, k3, d_qk3 = q.view(-1, C, K), k.view(-1, C, K), d_qk.view(-1, C, C)
    d_q = torch.baddbmm((d_qg * e_in.unsqueeze(-1)).sum(group).view(-1, C, K), d_qk3, k3)
    d_k = torch.addcmul(d_kb * (beta * e_in).unsqueeze(-1), d_kd, e_out.unsqueeze(-1)).sum(group).view(-1, C, K)
    d_k = torch.baddbmm(torch.baddbmm(d_k, (d_kk + d_kk.mT).view(-1, C, C), k3), d_qk3.mT, q3)

    # gamma enters through Gam (gamma_i - gamma_j), e_in, e_out (gamma_C - gamma_i) and exp(gamma_C).
    d_eout = d_eout * e_out
    d_gamma = d_log_gam.sum(-1) - d_log_gam.sum(-2) + d_ein * e_in - d_eout
    d_gamma[..., -1] += d_eout.sum(-1) + d_decay * e_in[..., -1]
    d_g = d_gamma.flip(-1).cumsum(-1).flip(-1)  # gamma = cumsum(g)
    return d_q.view(q.shape), d_k.view(k.shape), d_v, d_g, d_beta, d_s0.view(-1, B, H, G, K, V)


def residual_shapes(batch, seqlen, H, HV, K, V, num_seqs=None):
    """Shapes of the residuals of `_chunk_forward` for inputs [batch, seqlen, ...], or for a packed row of num_seqs
    sequences: then with as many chunks as the static bound ceil(T / C) + N - 1 on the sum of ceil(T_n / C) (the op
    pads a packed row's residuals to it, so that their shapes do not depend on the values of cu_seqlens)."""
    C, G = CHUNK_SIZE, HV // H
    if num_seqs is None:
        lead = (-(-seqlen // C), batch, H)
    else:
        lead = (-(-seqlen // C) + num_seqs - 1, 1, H)
    cc, vg = lead + (G, C, C), lead + (G, C, V)
    return [cc, lead + (1, C, C), cc, cc, lead + (G, C, K), vg, lead + (G, K, V), vg]


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """`_chunk_forward` with its hand-written backward `_chunk_backward`. Given `saved_residuals` (those of an
    earlier forward on the same inputs) it computes nothing: its outputs are then uninitialised placeholders of the
    right shapes, there only so that autograd runs `_chunk_backward` on the saved residuals (the op's backward)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, seq_chunks, saved_residuals):
        if saved_residuals is None:
            o, finals, residuals = _chunk_forward(q, k, v, g, beta, s0, seq_chunks)
        else:
            o, finals, residuals = v.new_empty(v.shape), s0.new_empty(s0.shape), saved_residuals
        ctx.seq_chunks = seq_chunks
        ctx.save_for_backward(q, k, v, g, beta, *residuals)
        return o, finals

    @staticmethod
    def backward(ctx, d_o, d_finals):
        q, k, v, g, beta, *residuals = ctx.saved_tensors
        return *_chunk_backward(q, k, v, g, beta, residuals, ctx.seq_chunks, d_o, d_finals), None, None


@_without_autocast
def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False):
    """Chunked gated delta rule (chunk 64). Shapes and semantics: `kernels.chunk_gated_delta_rule`."""
    return _chunk_rule(lambda *chunked: _ChunkGatedDeltaRule.apply(*chunked, None), q, k, v, g, beta, scale,
                       initial_state, output_final_state, cu_seqlens, use_qk_l2norm)


@_without_autocast
def chunk_gated_delta_rule_with_residuals(q, k, v, g, beta, scale=None, initial_state=None,
                                          output_final_state=False, cu_seqlens=None, use_qk_l2norm=False):
    """The forward of `chunk_gated_delta_rule` (no autograd) and its residuals, with the shapes of
    `residual_shapes` (a packed row's padded to the bound), for `chunk_gated_delta_rule_replay`."""
    residuals = []

    def core(q, k, v, g, beta, s0, seq_chunks):
        o, finals, saved = _chunk_forward(q, k, v, g, beta, s0, seq_chunks)
        residuals.extend(saved)
        return o, finals

    o, final_state = _chunk_rule(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                 use_qk_l2norm)
    if cu_seqlens is not None:
        (B, T, H, K), (HV, V) = q.shape, v.shape[2:]
        bound = residual_shapes(B, T, H, HV, K, V, cu_seqlens.shape[0] - 1)[0][0]
        residuals = [torch.cat([r, r.new_zeros(bound - r.shape[0], *r.shape[1:])]) for r in residuals]
    return o, final_state, residuals


@_without_autocast
def chunk_gated_delta_rule_replay(residuals, q, k, v, g, beta, scale=None, initial_state=None,
                                  output_final_state=False, cu_seqlens=None, use_qk_l2norm=False):
    """`chunk_gated_delta_rule` for its backward only: the chunked core is not recomputed but takes the residuals
    of `chunk_gated_delta_rule_with_residuals` on the same inputs, so the outputs' values are meaningless while
    autograd through them gives the gradients (the layout and L2-norm steps around the core are recomputed)."""

    def core(q, k, v, g, beta, s0, seq_chunks):
        return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, s0, seq_chunks,
                                          tuple(r[:q.shape[0]] for r in residuals))  # unpadded

    return _chunk_rule(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)


def _chunk_rule(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    """The layout around the chunked core: core(q, k, v, g, beta, s0, seq_chunks) -> (o, final states) on the
    layout of `_chunk_scan_input`."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H
    out_dtype = v.dtype
    q, k, v, g, beta, dtype = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)

    if cu_seqlens is None:
        N = B
        states_shape = (1, B, H, G, K, V)  # one scan over a batch of B rows
        seq_chunks = [(0, math.ceil(T / CHUNK_SIZE))]
        chunked = _chunk_scan_input(q, k, v, g, beta)
    else:
        # Each sequence is zero-padded to whole chunks and the chunks are laid end to end (one batch row):
        # every chunk belongs to one sequence, so only the scan needs to know the boundaries, and the padding
        # costs at most one chunk per sequence (a [N, T_max] layout would cost N * T_max).
        bounds, lengths = _sequence_bounds(cu_seqlens, T)
        N = len(lengths)
        n_chunks = [math.ceil(n / CHUNK_SIZE) for n in lengths]
        first = [sum(n_chunks[:i]) for i in range(N)]
        seq_chunks = [(f, f + n) for f, n in zip(first, n_chunks)]
        shift = torch.tensor([f * CHUNK_SIZE - s for f, s in zip(first, bounds[:-1])], device=q.device)
        index = torch.arange(T, device=q.device) + shift.repeat_interleave(torch.tensor(lengths, device=q.device))
        rows = sum(n_chunks) * CHUNK_SIZE
        chunked = _chunk_scan_input(*(_scatter_rows(x[0], index, rows)[None] for x in (q, k, v, g, beta)))
        states_shape = (N, 1, H, G, K, V)  # one scan per sequence, over one row

    s0 = q.new_zeros(states_shape) if initial_state is None else initial_state.to(dtype).reshape(states_shape)
    o, finals = core(*chunked, s0, seq_chunks)
    NC, Bc, _, _, C, _ = o.shape
    o = o.permute(1, 0, 4, 2, 3, 5).reshape(Bc, NC * C, HV, V)
    o = o[:, :T] if cu_seqlens is None else o[0].index_select(0, index)[None]
    final_state = None
    if output_final_state:
        final_state = finals.reshape(N, HV, K, V)
    return o.to(out_dtype), final_state


@_without_autocast
def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False):
    """Token-by-token gated delta rule (decoding). Shapes and semantics: `kernels.recurrent_gated_delta_rule`."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H
    out_dtype = v.dtype
    q, k, v, g, beta, dtype = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    if cu_seqlens is not None:
        # Sequences side by side in a zero-padded [N, T_max] batch: the scan is as long as the longest sequence,
        # and the end padding (k = v = g = beta = 0) leaves each final state unchanged.
        bounds, lengths = _sequence_bounds(cu_seqlens, T)
        B, T = len(lengths), max(lengths)
        shift = torch.tensor([n * T - s for n, s in enumerate(bounds[:-1])], device=q.device)
        index = torch.arange(bounds[-1], device=q.device) + shift.repeat_interleave(
            torch.tensor(lengths, device=q.device))
        q, k, v, g, beta = (_scatter_rows(x[0], index, B * T).view(B, T, *x.shape[2:]) for x in (q, k, v, g, beta))

    bhg = B * HV
    s = q.new_zeros(bhg, K, V) if initial_state is None else initial_state.to(dtype).reshape(bhg, K, V)
    # Time-major 3-D operands [T, B * HV, ...] so that each step is plain (b)bmm calls on contiguous slices.
    # q/k are repeated over the G value heads here: a matmul that broadcasts them would copy them every step.
    q, k = (x.transpose(0, 1).unsqueeze(3).expand(T, B, H, G, K).reshape(T, bhg, 1, K) for x in (q, k))
    v = v.transpose(0, 1).reshape(T, bhg, 1, V)
    decay, beta = (x.transpose(0, 1).reshape(T, bhg, 1, 1) for x in (g.exp(), beta))
    outs = []
    for q_t, k_t, v_t, decay_t, beta_t in zip(q, k, v, decay, beta):
        s = s * decay_t
        s = torch.addcmul(s, k_t.mT, torch.baddbmm(v_t, k_t, s, alpha=-1) * beta_t)
        outs.append(torch.bmm(q_t, s))
    o = torch.stack(outs).view(T, B, HV, V).transpose(0, 1)
    if cu_seqlens is not None:
        o = o.reshape(B * T, HV, V).index_select(0, index)[None]
    return o.to(out_dtype).contiguous(), (s.view(B, HV, K, V) if output_final_state else None)
