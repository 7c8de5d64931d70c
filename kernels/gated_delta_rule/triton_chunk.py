"""Chunked gated delta rule in Triton: forward and backward (chunk 64, fp32 state and accumulation).

Per value head, a chunk of C = 64 tokens entering with state S [K, V] is processed in the UT / WY form
(gamma = within-chunk cumsum of the log decay g, Gamma_ij = exp(gamma_i - gamma_j)):

    Tm    = (I + A)^-1,  A = strictLower(diag(beta) (K K^T) * Gamma)
    W     = Tm diag(beta exp(gamma)) K,   U = Tm diag(beta) V
    V_new = U - W S
    O     = scale (diag(exp(gamma)) Q S + lower(Q K^T * Gamma) V_new)      (lower: diagonal included)
    S'    = exp(gamma_last) S + (diag(exp(gamma_last - gamma)) K)^T V_new

Forward, four launches: `_prepare_kernel` (gamma, Tm; chunk-parallel) -> `_wu_kernel` (W, U; chunk-parallel)
-> `_state_kernel` (walks the chunks of a sequence: per-chunk entry states h and V_new) -> `_output_kernel` (O;
chunk-parallel, Q K^T once per chunk with the V blocks looped inside).
q and k are L2-normalised (when asked) once, before the kernels, which read them normalised in the input dtype.
Backward: from the forward's residuals (gamma, Tm, W, h, V_new, the norms, the chunk table: nothing of the forward
is recomputed), `_local_dv_kernel` (the part of dV_new that does not depend on the state), `_state_bwd_kernel` (walks the chunks in reverse:
per-chunk dS at the chunk end and the full dV_new), `_wy_bwd_kernel` (through U, W and Tm: dv, dbeta, part of
dk and dgamma) and `_qk_bwd_kernel` (through O and the state update: dq, the rest of dk, dg).

Layout: tokens are flattened ([B, T, ...] -> [B*T, ...]), sequences are spans of cu_seqlens (fixed-length batches
use cu_seqlens = [0, T, 2T, ...]). A chunk table gives each chunk-parallel program its (sequence, first token);
it is built on the device with shapes known from the inputs, so varlen launches never sync with the host.
Everything uses plain pointer arithmetic with masks (no block pointers: they are gone in Triton 3.9).
Intermediates (Tm, W, U, V_new, h, dh) are stored in the input dtype like the inputs of a bf16 matmul; gamma,
states and gradients of q, k, g, beta stay fp32.
"""

import torch
import triton
import triton.language as tl

CHUNK = 64
SUB_CHUNK = 16  # Tm is assembled from inverted 16x16 diagonal blocks merged with matmuls

# tl.sum, tl.cumsum and tl.zeros are themselves @triton.jit functions, fixed as compiled or interpreted when triton
# is imported; the CPU tests interpret these kernels even when triton was imported without TRITON_INTERPRET=1, so
# the kernels use the builtins underneath: tl.reduce / tl.associative_scan with triton's own add combiner (which
# the interpreter maps onto numpy) and tl.full.
_ADD = tl.standard._sum_combine

# Chunk-table kinds besides a sequence index (see `chunk_layout`).
PADDING = tl.constexpr(-1)
TAIL = tl.constexpr(-2)


# ---------------------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _load_rows(ptr, tok, tok_mask, row_stride, cols, n_cols):
    """fp32 tile [len(tok), len(cols)] of rows `tok` of a row-major tensor; out-of-range entries read 0."""
    return tl.load(ptr + tok[:, None] * row_stride + cols[None, :],
                   mask=tok_mask[:, None] & (cols < n_cols)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, tok, tok_mask, row_stride, cols, n_cols, x):
    tl.store(ptr + tok[:, None] * row_stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=tok_mask[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _load_state(ptr, rows_k, cols_v, K, V):
    """fp32 tile [BK, BV] of a [K, V] matrix."""
    return tl.load(ptr + rows_k[:, None] * V + cols_v[None, :],
                   mask=(rows_k < K)[:, None] & (cols_v < V)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, rows_k, cols_v, K, V, x):
    tl.store(ptr + rows_k[:, None] * V + cols_v[None, :], x.to(ptr.dtype.element_ty),
             mask=(rows_k < K)[:, None] & (cols_v < V)[None, :])


@triton.jit
def _load_qk(ptr, tok, tok_mask, head, H, K, cols):
    """q or k rows of one head in fp32 (already L2-normalised by the launcher when asked)."""
    return _load_rows(ptr + head * K, tok, tok_mask, H * K, cols, K)


@triton.jit
def _load_head_scalar(ptr, tok, tok_mask, hv, HV):
    """Per-token value of head hv of a [tokens, HV] tensor (g, beta, gamma) in fp32; 0 outside the sequence."""
    return tl.load(ptr + tok * HV + hv, mask=tok_mask, other=0.0).to(tl.float32)


@triton.jit
def _last_row_value(x, rows, last):
    """x[last] for a 1-D tile (last is a runtime scalar)."""
    return tl.reduce(tl.where(rows == last, x, 0.0), 0, _ADD)


@triton.jit
def _load_gamma(gcum_ptr, tok, valid, hv, HV, rows, last):
    """(gamma of a chunk's rows, gamma of its last valid row `last`). Rows past the end of the sequence take the
    last valid row's value, as if their g were 0 (which is how the prepare kernel's scan treats them): then every
    decay exp(gamma_i - gamma_j) with i >= j is <= 1 for the non-increasing gamma of a log decay g <= 0. A 0 there
    would give exp(0 - gamma_j), which overflows for a fast-decaying head (gamma_j < -88) and turns the masked
    rows' 0 * inf into NaN in every product that sums over them (the backward's transposed ones do)."""
    gam = _load_head_scalar(gcum_ptr, tok, valid, hv, HV)
    gam_last = _last_row_value(gam, rows, last)
    return tl.where(valid, gam, gam_last), gam_last


@triton.jit
def _sequence_of_program(cu_ptr, chunk_offsets_ptr, HV, K, V):
    """What a state-walking program (grid axis 0 = sequence x value head, which may pass the 65,535 limit of the
    other axes; axis 1 = V block) works on: (value head hv, its first token, end token, first global chunk, chunk
    count, offset of its [K, V] state in an [N, HV, K, V] tensor)."""
    n = (tl.program_id(0) // HV).to(tl.int64)  # int64: state offsets can pass 2^31 with many sequences
    hv = tl.program_id(0) % HV
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets_ptr + n).to(tl.int64)
    num_chunks = tl.load(chunk_offsets_ptr + n + 1).to(tl.int64) - first_chunk
    return hv, bos, eos, first_chunk, num_chunks, (n * HV + hv) * K * V


@triton.jit
def _load_state_or_zeros(ptr, offset, rows_k, cols_v, K, V, LOAD: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr):
    """The state tile at ptr + offset, or zeros when LOAD is false (ptr is then None)."""
    if LOAD:
        return _load_state(ptr + offset, rows_k, cols_v, K, V)
    else:
        return tl.full([BK, BV], 0.0, tl.float32)


@triton.jit
def _chunk_of_program(chunks_ptr, c):
    """(kind, first token, end of its span) of entry c of the chunk table (`chunk_layout`): kind is the sequence
    index (>= 0) for a chunk of a sequence, PADDING for the unused entries of the static bound, TAIL for a chunk of
    the rows after cu_seqlens[-1] (whose outputs and gradients the kernels that write them set to zero)."""
    kind = tl.load(chunks_ptr + 3 * c)
    t0 = tl.load(chunks_ptr + 3 * c + 1).to(tl.int64)
    end = tl.load(chunks_ptr + 3 * c + 2).to(tl.int64)
    return kind, t0, end


@triton.jit
def _store_zero_rows(ptr, tok, tok_mask, row_stride, n_cols, BT: tl.constexpr, BN: tl.constexpr):
    """Zero rows `tok` ([BT]) of a row-major tensor, columns 0..n_cols-1 in blocks of BN."""
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        _store_rows(ptr, tok, tok_mask, row_stride, cols, n_cols, tl.full([BT, BN], 0.0, tl.float32))


@triton.jit
def _decayed_kkt_block(k_i, k_j, beta_i, gamma_i, gamma_j, DIAGONAL: tl.constexpr, BC: tl.constexpr,
                       PREC: tl.constexpr):
    """Block (i, j) of A = strictLower(diag(beta) (K K^T) * Gamma) from k blocks already in the input dtype;
    DIAGONAL blocks keep their strict lower triangle. k_j is transposed as a loaded tile, never as a 16-bit dot
    result fed to tl.dot (fla #640's Hopper miscompile)."""
    kk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC)
    diff = gamma_i[:, None] - gamma_j[None, :]
    if DIAGONAL:
        rows = tl.arange(0, BC)
        strict = rows[:, None] > rows[None, :]
        # The mask goes inside exp too: above the diagonal the exponent is positive and could overflow.
        return tl.where(strict, kk * beta_i[:, None] * tl.exp(tl.where(strict, diff, 0.0)), 0.0)
    return kk * beta_i[:, None] * tl.exp(diff)


@triton.jit
def _invert_unit_lower(a, BC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [16, 16] block, in fp32 (true fp32 matmuls: this is where
    tf32 rounding would be the largest error, and the blocks are tiny).

    a is nilpotent (a^16 = 0), so the inverse is the finite series sum_{n<16} (-a)^n, evaluated in product form
    (I - a)(I + a^2)(I + a^4)(I + a^8): six small matmuls instead of a 15-step row-by-row substitution.
    """
    tl.static_assert(BC == 16)
    rows = tl.arange(0, BC)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    a2 = tl.dot(a, a, input_precision="ieee")
    a4 = tl.dot(a2, a2, input_precision="ieee")
    a8 = tl.dot(a4, a4, input_precision="ieee")
    inv = tl.dot(eye - a, eye + a2, input_precision="ieee")
    inv = tl.dot(inv, eye + a4, input_precision="ieee")
    return tl.dot(inv, eye + a8, input_precision="ieee")


@triton.jit
def _load_sub_block(k_ptr, g_ptr, beta_ptr, tok, tok_mask, h, hv, H, HV, K, cols_k):
    """k rows (in the input dtype), g and beta of a 16-token sub-block."""
    k = tl.load(k_ptr + (tok * H + h)[:, None] * K + cols_k[None, :],
                mask=tok_mask[:, None] & (cols_k < K)[None, :], other=0.0)
    g = tl.load(g_ptr + tok * HV + hv, mask=tok_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok * HV + hv, mask=tok_mask, other=0.0).to(tl.float32)
    return k, g, beta


# ---------------------------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def _prepare_kernel(k_ptr, g_ptr, beta_ptr, gcum_ptr, tm_ptr, chunks_ptr,
                    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    PREC: tl.constexpr):
    """Per (chunk, value head): gamma and Tm = (I + A)^-1 (stored in the input dtype; W and U are `_wu_kernel`'s).
    The 64-row chunk is handled as four 16-row sub-blocks so that Tm can be assembled from inverted 16x16 diagonal
    blocks."""
    tl.static_assert(BT == 4 * BC)
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    if kind == PADDING:
        return  # TAIL chunks are prepared like a sequence's: the residuals saved for the backward are all defined
    sub = tl.arange(0, BC)
    cols_k = tl.arange(0, BK)
    tok0 = t0 + sub
    tok1 = tok0 + BC
    tok2 = tok1 + BC
    tok3 = tok2 + BC
    m0 = tok0 < eos
    m1 = tok1 < eos
    m2 = tok2 < eos
    m3 = tok3 < eos

    kc0, g0, b0 = _load_sub_block(k_ptr, g_ptr, beta_ptr, tok0, m0, h, hv, H, HV, K, cols_k)
    kc1, g1, b1 = _load_sub_block(k_ptr, g_ptr, beta_ptr, tok1, m1, h, hv, H, HV, K, cols_k)
    kc2, g2, b2 = _load_sub_block(k_ptr, g_ptr, beta_ptr, tok2, m2, h, hv, H, HV, K, cols_k)
    kc3, g3, b3 = _load_sub_block(k_ptr, g_ptr, beta_ptr, tok3, m3, h, hv, H, HV, K, cols_k)

    # gamma: cumsum of g from the chunk start, carried across the sub-blocks.
    gam0 = tl.associative_scan(g0, 0, _ADD)
    gam1 = tl.associative_scan(g1, 0, _ADD) + tl.reduce(g0, 0, _ADD)
    gam2 = tl.associative_scan(g2, 0, _ADD) + tl.reduce(g1, 0, _ADD) + tl.reduce(g0, 0, _ADD)
    gam3 = tl.associative_scan(g3, 0, _ADD) + tl.reduce(g2, 0, _ADD) + tl.reduce(g1, 0, _ADD) + tl.reduce(g0, 0, _ADD)
    tl.store(gcum_ptr + tok0 * HV + hv, gam0, mask=m0)
    tl.store(gcum_ptr + tok1 * HV + hv, gam1, mask=m1)
    tl.store(gcum_ptr + tok2 * HV + hv, gam2, mask=m2)
    tl.store(gcum_ptr + tok3 * HV + hv, gam3, mask=m3)

    a00 = _decayed_kkt_block(kc0, kc0, b0, gam0, gam0, True, BC, PREC)
    a11 = _decayed_kkt_block(kc1, kc1, b1, gam1, gam1, True, BC, PREC)
    a22 = _decayed_kkt_block(kc2, kc2, b2, gam2, gam2, True, BC, PREC)
    a33 = _decayed_kkt_block(kc3, kc3, b3, gam3, gam3, True, BC, PREC)
    a10 = _decayed_kkt_block(kc1, kc0, b1, gam1, gam0, False, BC, PREC)
    a20 = _decayed_kkt_block(kc2, kc0, b2, gam2, gam0, False, BC, PREC)
    a21 = _decayed_kkt_block(kc2, kc1, b2, gam2, gam1, False, BC, PREC)
    a30 = _decayed_kkt_block(kc3, kc0, b3, gam3, gam0, False, BC, PREC)
    a31 = _decayed_kkt_block(kc3, kc1, b3, gam3, gam1, False, BC, PREC)
    a32 = _decayed_kkt_block(kc3, kc2, b3, gam3, gam2, False, BC, PREC)

    # Block forward substitution: Tm_rc = -Tm_rr sum_{c <= s < r} A_rs Tm_sc, in fp32.
    t00 = _invert_unit_lower(a00, BC)
    t11 = _invert_unit_lower(a11, BC)
    t22 = _invert_unit_lower(a22, BC)
    t33 = _invert_unit_lower(a33, BC)
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision="ieee"), input_precision="ieee")
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision="ieee"), input_precision="ieee")
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision="ieee"), input_precision="ieee")
    acc = tl.dot(a20, t00, input_precision="ieee")
    acc = tl.dot(a21, t10, acc, input_precision="ieee")
    t20 = -tl.dot(t22, acc, input_precision="ieee")
    acc = tl.dot(a31, t11, input_precision="ieee")
    acc = tl.dot(a32, t21, acc, input_precision="ieee")
    t31 = -tl.dot(t33, acc, input_precision="ieee")
    acc = tl.dot(a30, t00, input_precision="ieee")
    acc = tl.dot(a31, t10, acc, input_precision="ieee")
    acc = tl.dot(a32, t20, acc, input_precision="ieee")
    t30 = -tl.dot(t33, acc, input_precision="ieee")

    # Tm rows [tokens, HV, BT], zero above the diagonal blocks.
    tm_row = HV * BT
    tm_head = tm_ptr + hv * BT
    zero = tl.full([BC, BC], 0.0, tl.float32)
    _store_rows(tm_head + BC, tok0, m0, tm_row, sub, BC, zero)
    _store_rows(tm_head + 2 * BC, tok0, m0, tm_row, sub, BC, zero)
    _store_rows(tm_head + 3 * BC, tok0, m0, tm_row, sub, BC, zero)
    _store_rows(tm_head + 2 * BC, tok1, m1, tm_row, sub, BC, zero)
    _store_rows(tm_head + 3 * BC, tok1, m1, tm_row, sub, BC, zero)
    _store_rows(tm_head + 3 * BC, tok2, m2, tm_row, sub, BC, zero)
    _store_rows(tm_head, tok0, m0, tm_row, sub, BC, t00)
    _store_rows(tm_head, tok1, m1, tm_row, sub, BC, t10)
    _store_rows(tm_head + BC, tok1, m1, tm_row, sub, BC, t11)
    _store_rows(tm_head, tok2, m2, tm_row, sub, BC, t20)
    _store_rows(tm_head + BC, tok2, m2, tm_row, sub, BC, t21)
    _store_rows(tm_head + 2 * BC, tok2, m2, tm_row, sub, BC, t22)
    _store_rows(tm_head, tok3, m3, tm_row, sub, BC, t30)
    _store_rows(tm_head + BC, tok3, m3, tm_row, sub, BC, t31)
    _store_rows(tm_head + 2 * BC, tok3, m3, tm_row, sub, BC, t32)
    _store_rows(tm_head + 3 * BC, tok3, m3, tm_row, sub, BC, t33)


@triton.jit
def _wu_kernel(k_ptr, v_ptr, beta_ptr, gcum_ptr, tm_ptr, w_ptr, u_ptr, chunks_ptr,
               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, value head): W = Tm diag(beta exp(gamma)) K and U = Tm diag(beta) V, as [BT, BT] x [BT, BW]
    matmuls in the input dtype over column blocks of K and V (Tm as `_prepare_kernel` stored it)."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    DT = k_ptr.dtype.element_ty
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    if kind == PADDING:
        return  # TAIL chunks get W like a sequence's (the backward reads it)
    rows = tl.arange(0, BT)
    tok = t0 + rows
    valid = tok < eos
    # Tm's rows past the end are not stored; its entries above the diagonal are stored zeros.
    tm = tl.load(tm_ptr + (tok * HV + hv)[:, None] * BT + rows[None, :], mask=valid[:, None], other=0.0).to(DT)
    beta = _load_head_scalar(beta_ptr, tok, valid, hv, HV)
    beta_decayed = beta * tl.exp(_load_head_scalar(gcum_ptr, tok, valid, hv, HV))
    for k0 in range(0, K, BW):
        cols = k0 + tl.arange(0, BW)
        k = _load_qk(k_ptr, tok, valid, h, H, K, cols)
        w = tl.dot(tm, (k * beta_decayed[:, None]).to(DT), input_precision=PREC)
        _store_rows(w_ptr + hv * K, tok, valid, HV * K, cols, K, w)
    for v0 in range(0, V, BW):
        cols = v0 + tl.arange(0, BW)
        v = _load_rows(v_ptr + hv * V, tok, valid, HV * V, cols, V)
        u = tl.dot(tm, (v * beta[:, None]).to(DT), input_precision=PREC)
        _store_rows(u_ptr + hv * V, tok, valid, HV * V, cols, V, u)


@triton.jit
def _load_tile(ptr, tok, tok_mask, row_stride, col0, n_cols, BKB: tl.constexpr):
    """Columns col0..col0+BKB-1 of rows `tok` of a row-major tensor, a [len(tok), BKB] tile in the stored dtype."""
    cols = col0 + tl.arange(0, BKB)
    return tl.load(ptr + tok[:, None] * row_stride + cols[None, :],
                   mask=tok_mask[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _load_tile_t(ptr, tok, tok_mask, row_stride, col0, n_cols, BKB: tl.constexpr):
    """The transpose of `_load_tile`, [BKB, len(tok)], read as such from memory: a matmul operand that needs no
    transpose through registers or shared memory."""
    cols = col0 + tl.arange(0, BKB)
    return tl.load(ptr + tok[None, :] * row_stride + cols[:, None],
                   mask=tok_mask[None, :] & (cols < n_cols)[:, None], other=0.0)


@triton.jit
def _store_block_and_project(state_ptr, x_head, tok, valid, row_stride, kb: tl.constexpr, rows_kb, cols_v, K, V, s,
                             acc, BKB: tl.constexpr, PREC: tl.constexpr):
    """Stores K block `kb` of a state walk's state (its tile `s`) and returns acc + X[:, block kb] s."""
    _store_state(state_ptr, kb * BKB + rows_kb, cols_v, K, V, s)
    x = _load_tile(x_head, tok, valid, row_stride, kb * BKB, K, BKB)
    return tl.dot(x, s.to(x.dtype), acc, input_precision=PREC)


@triton.jit
def _project_t(x_head, tok, valid, row_stride, kb: tl.constexpr, K, y, acc, BKB: tl.constexpr, PREC: tl.constexpr):
    """acc + X[:, block kb]^T y: a state tile's update, X^T read as such from memory."""
    return tl.dot(_load_tile_t(x_head, tok, valid, row_stride, kb * BKB, K, BKB), y, acc, input_precision=PREC)


@triton.jit
def _walk_gamma(gcum_ptr, tok, valid, last_tok, hv, HV):
    """(gamma of a chunk's rows, gamma of its last valid row `last_tok`) for a state walk. The last value is read as
    a scalar (no reduction across the tile inside the sequential loop); rows past the end of the sequence read 0,
    which the walks only use as the factor of a zero row (masked loads) or under a mask."""
    gam = tl.load(gcum_ptr + tok * HV + hv, mask=valid, other=0.0)
    gam_last = tl.load(gcum_ptr + last_tok * HV + hv)
    return gam, gam_last


# The state walks hold the [K, BV] state as up to four [BKB, BV] register tiles (BKB = 64 for K > 32; K <= 4 BKB):
# rows [j BKB, (j + 1) BKB) are tile j. Each matmul then has a 64-wide contraction or output dimension, the
# [64, BT] / [BT, 64] operand tiles are read straight from memory in the input dtype, and the loop holds no
# [BT, K] tile in registers. The `if K > j * BKB` branches are resolved at compile time. The dot results they cast
# to 16 bits (the state tiles, V_new and dV_new scaled by row factors) go into the next tl.dot untransposed: the
# transposed operands are loaded tiles, never a tl.trans of such a cast (the Hopper miscompile of fla #640).


@triton.jit
def _state_kernel(k_ptr, w_ptr, u_ptr, gcum_ptr, h0_ptr, h_ptr, vnew_ptr, ht_ptr, cu_ptr, chunk_offsets_ptr,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr,
                  HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """Per (sequence x value head, V block): walk the chunks in order, keeping S [K, BV] in fp32. Stores the
    entry state of every chunk (h) and V_new = U - W S; optionally the final state. Per chunk:
        S <- exp(gamma_last) S + K^T (diag(exp(gamma_last - gamma)) V_new)
    (the decay on the rows of V_new, a [BT, BV] tile, rather than on K, which is read as its [BKB, BT] transpose)."""
    tl.static_assert(K <= 4 * BKB)
    hv, bos, eos, first_chunk, num_chunks, state_offset = _sequence_of_program(cu_ptr, chunk_offsets_ptr, HV, K, V)
    DT = k_ptr.dtype.element_ty
    k_head = k_ptr + (hv // (HV // H)) * K
    w_head = w_ptr + hv * K
    rows = tl.arange(0, BT)
    rows_kb = tl.arange(0, BKB)
    cols_v = tl.program_id(1) * BV + tl.arange(0, BV)
    s0 = _load_state_or_zeros(h0_ptr, state_offset, rows_kb, cols_v, K, V, HAS_H0, BKB, BV)
    if K > BKB:
        s1 = _load_state_or_zeros(h0_ptr, state_offset, BKB + rows_kb, cols_v, K, V, HAS_H0, BKB, BV)
    if K > 2 * BKB:
        s2 = _load_state_or_zeros(h0_ptr, state_offset, 2 * BKB + rows_kb, cols_v, K, V, HAS_H0, BKB, BV)
    if K > 3 * BKB:
        s3 = _load_state_or_zeros(h0_ptr, state_offset, 3 * BKB + rows_kb, cols_v, K, V, HAS_H0, BKB, BV)
    for i in range(0, num_chunks):
        t0 = bos + i * BT
        tok = t0 + rows
        valid = tok < eos
        # The entry state, and W S one K block at a time.
        h_chunk = h_ptr + ((first_chunk + i) * HV + hv) * K * V
        ws = _store_block_and_project(h_chunk, w_head, tok, valid, HV * K, 0, rows_kb, cols_v, K, V, s0,
                                      tl.full([BT, BV], 0.0, tl.float32), BKB, PREC)
        if K > BKB:
            ws = _store_block_and_project(h_chunk, w_head, tok, valid, HV * K, 1, rows_kb, cols_v, K, V, s1, ws, BKB,
                                          PREC)
        if K > 2 * BKB:
            ws = _store_block_and_project(h_chunk, w_head, tok, valid, HV * K, 2, rows_kb, cols_v, K, V, s2, ws, BKB,
                                          PREC)
        if K > 3 * BKB:
            ws = _store_block_and_project(h_chunk, w_head, tok, valid, HV * K, 3, rows_kb, cols_v, K, V, s3, ws, BKB,
                                          PREC)
        v_new = _load_rows(u_ptr + hv * V, tok, valid, HV * V, cols_v, V) - ws
        _store_rows(vnew_ptr + hv * V, tok, valid, HV * V, cols_v, V, v_new)
        gam, gam_last = _walk_gamma(gcum_ptr, tok, valid, tl.minimum(eos, t0 + BT) - 1, hv, HV)
        v_to_end = (v_new * tl.where(valid, tl.exp(gam_last - gam), 0.0)[:, None]).to(DT)
        decay = tl.exp(gam_last)
        s0 = _project_t(k_head, tok, valid, H * K, 0, K, v_to_end, s0 * decay, BKB, PREC)
        if K > BKB:
            s1 = _project_t(k_head, tok, valid, H * K, 1, K, v_to_end, s1 * decay, BKB, PREC)
        if K > 2 * BKB:
            s2 = _project_t(k_head, tok, valid, H * K, 2, K, v_to_end, s2 * decay, BKB, PREC)
        if K > 3 * BKB:
            s3 = _project_t(k_head, tok, valid, H * K, 3, K, v_to_end, s3 * decay, BKB, PREC)
    if STORE_HT:
        _store_state(ht_ptr + state_offset, rows_kb, cols_v, K, V, s0)
        if K > BKB:
            _store_state(ht_ptr + state_offset, BKB + rows_kb, cols_v, K, V, s1)
        if K > 2 * BKB:
            _store_state(ht_ptr + state_offset, 2 * BKB + rows_kb, cols_v, K, V, s2)
        if K > 3 * BKB:
            _store_state(ht_ptr + state_offset, 3 * BKB + rows_kb, cols_v, K, V, s3)


@triton.jit
def _output_kernel(q_ptr, k_ptr, gcum_ptr, h_ptr, vnew_ptr, o_ptr, chunks_ptr, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr):
    """Per (chunk, value head): O = scale (diag(exp(gamma)) Q h + lower(Q K^T * Gamma) V_new), V in blocks of BV
    inside the program, so that the masked, decayed Q K^T is computed once per chunk and kept in registers; zeros
    on the rows after cu_seqlens[-1] (and in their h and V_new)."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    DT = k_ptr.dtype.element_ty
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    rows = tl.arange(0, BT)
    rows_k = tl.arange(0, BK)
    tok = t0 + rows
    valid = tok < eos
    h_chunk = h_ptr + (c.to(tl.int64) * HV + hv) * K * V
    if kind < 0:
        # No state walk visits the table entries of the tail and padding: their h and V_new (saved for the
        # backward) are set here, as is the output of the tail rows.
        for v0 in range(0, V, BV):
            cols_v = v0 + tl.arange(0, BV)
            _store_state(h_chunk, rows_k, cols_v, K, V, tl.full([BK, BV], 0.0, tl.float32))
            if kind == TAIL:
                zeros = tl.full([BT, BV], 0.0, tl.float32)
                _store_rows(o_ptr + hv * V, tok, valid, HV * V, cols_v, V, zeros)
                _store_rows(vnew_ptr + hv * V, tok, valid, HV * V, cols_v, V, zeros)
        return
    q = _load_qk(q_ptr, tok, valid, h, H, K, rows_k)
    k = _load_qk(k_ptr, tok, valid, h, H, K, rows_k).to(DT)
    gam, _ = _load_gamma(gcum_ptr, tok, valid, hv, HV, rows, tl.minimum(eos - t0, BT) - 1)
    causal = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0))
    # The transposed operand is a loaded tile (k); the 16-bit scores enter tl.dot untransposed (fla #640's Hopper
    # miscompile needs tl.trans of a 16-bit dot result fed to tl.dot).
    scores = tl.dot(q.to(DT), tl.trans(k), input_precision=PREC)
    scores = tl.where(causal, scores * decay * scale, 0.0).to(DT)
    q_decayed = (q * (scale * tl.exp(gam))[:, None]).to(DT)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        s = _load_state(h_chunk, rows_k, cols_v, K, V).to(DT)
        v_new = _load_rows(vnew_ptr + hv * V, tok, valid, HV * V, cols_v, V).to(DT)
        o = tl.dot(q_decayed, s, input_precision=PREC)
        o = tl.dot(scores, v_new, o, input_precision=PREC)
        _store_rows(o_ptr + hv * V, tok, valid, HV * V, cols_v, V, o)


# ---------------------------------------------------------------------------------------------------------------
# Backward kernels


@triton.jit
def _local_dv_kernel(q_ptr, k_ptr, gcum_ptr, do_ptr, dv_local_ptr, chunks_ptr, scale,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PREC: tl.constexpr):
    """Per (chunk, value head): the state-independent part of dV_new, scale lower(Q K^T * Gamma)^T dO, V in blocks
    of BV inside the program (the transposed scores are computed once per chunk)."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    DT = k_ptr.dtype.element_ty
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    if kind < 0:
        return
    rows = tl.arange(0, BT)
    cols_k = tl.arange(0, BK)
    tok = t0 + rows
    valid = tok < eos
    q = _load_qk(q_ptr, tok, valid, h, H, K, cols_k).to(DT)
    k = _load_qk(k_ptr, tok, valid, h, H, K, cols_k).to(DT)
    gam, _ = _load_gamma(gcum_ptr, tok, valid, hv, HV, rows, tl.minimum(eos - t0, BT) - 1)
    # Transposed scores: entry (j, i) = q_i . k_j Gamma_ij for j <= i, formed as K Q^T from loaded tiles rather than
    # as tl.trans of the 16-bit scores fed to tl.dot (fla #640's Hopper miscompile).
    anticausal = rows[:, None] <= rows[None, :]
    decay_t = tl.exp(tl.where(anticausal, gam[None, :] - gam[:, None], 0.0))
    scores_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    scores_t = tl.where(anticausal, scores_t * decay_t * scale, 0.0).to(DT)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        do = _load_rows(do_ptr + hv * V, tok, valid, HV * V, cols_v, V).to(DT)
        dv_local = tl.dot(scores_t, do, input_precision=PREC)
        _store_rows(dv_local_ptr + hv * V, tok, valid, HV * V, cols_v, V, dv_local)


@triton.jit
def _state_bwd_kernel(q_ptr, k_ptr, w_ptr, gcum_ptr, do_ptr, dv_local_ptr, dht_ptr, dh_ptr, dvnew_ptr, dh0_ptr,
                      cu_ptr, chunk_offsets_ptr, scale,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr,
                      HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """Per (sequence x value head, V block): walk the chunks in reverse with dS = dL/dS at the chunk end.
    Stores dS per chunk (dh), the full dV_new = dv_local + diag(exp(gamma_last - gamma)) K dS, and dL/d(initial
    state). Per chunk:
        dS <- exp(gamma_last) dS + Q^T (diag(scale exp(gamma)) dO) - W^T dV_new
    (the row factors on the [BT, BV] tiles K dS and dO, so q^T, w^T and k are read straight into the matmuls).
    fla PR #1262: ptxas 12.8 / 13.0 miscompile fla's Hopper state backward; tests/test_cuda.py checks this kernel
    at scale = 1 on a GPU."""
    tl.static_assert(K <= 4 * BKB)
    hv, bos, eos, first_chunk, num_chunks, state_offset = _sequence_of_program(cu_ptr, chunk_offsets_ptr, HV, K, V)
    DT = k_ptr.dtype.element_ty
    q_head = q_ptr + (hv // (HV // H)) * K
    k_head = k_ptr + (hv // (HV // H)) * K
    w_head = w_ptr + hv * K
    rows = tl.arange(0, BT)
    rows_kb = tl.arange(0, BKB)
    cols_v = tl.program_id(1) * BV + tl.arange(0, BV)
    ds0 = _load_state_or_zeros(dht_ptr, state_offset, rows_kb, cols_v, K, V, HAS_DHT, BKB, BV)
    if K > BKB:
        ds1 = _load_state_or_zeros(dht_ptr, state_offset, BKB + rows_kb, cols_v, K, V, HAS_DHT, BKB, BV)
    if K > 2 * BKB:
        ds2 = _load_state_or_zeros(dht_ptr, state_offset, 2 * BKB + rows_kb, cols_v, K, V, HAS_DHT, BKB, BV)
    if K > 3 * BKB:
        ds3 = _load_state_or_zeros(dht_ptr, state_offset, 3 * BKB + rows_kb, cols_v, K, V, HAS_DHT, BKB, BV)
    for j in range(0, num_chunks):
        i = num_chunks - 1 - j
        t0 = bos + i * BT
        tok = t0 + rows
        valid = tok < eos
        # dS at the chunk end, and K dS one K block at a time.
        dh_chunk = dh_ptr + ((first_chunk + i) * HV + hv) * K * V
        k_ds = _store_block_and_project(dh_chunk, k_head, tok, valid, H * K, 0, rows_kb, cols_v, K, V, ds0,
                                        tl.full([BT, BV], 0.0, tl.float32), BKB, PREC)
        if K > BKB:
            k_ds = _store_block_and_project(dh_chunk, k_head, tok, valid, H * K, 1, rows_kb, cols_v, K, V, ds1, k_ds,
                                            BKB, PREC)
        if K > 2 * BKB:
            k_ds = _store_block_and_project(dh_chunk, k_head, tok, valid, H * K, 2, rows_kb, cols_v, K, V, ds2, k_ds,
                                            BKB, PREC)
        if K > 3 * BKB:
            k_ds = _store_block_and_project(dh_chunk, k_head, tok, valid, H * K, 3, rows_kb, cols_v, K, V, ds3, k_ds,
                                            BKB, PREC)
        gam, gam_last = _walk_gamma(gcum_ptr, tok, valid, tl.minimum(eos, t0 + BT) - 1, hv, HV)
        dv_new = _load_rows(dv_local_ptr + hv * V, tok, valid, HV * V, cols_v, V) + \
            k_ds * tl.where(valid, tl.exp(gam_last - gam), 0.0)[:, None]
        _store_rows(dvnew_ptr + hv * V, tok, valid, HV * V, cols_v, V, dv_new)
        minus_dv_new = (-dv_new).to(DT)
        do = (_load_rows(do_ptr + hv * V, tok, valid, HV * V, cols_v, V) * (scale * tl.exp(gam))[:, None]).to(DT)
        decay = tl.exp(gam_last)
        ds0 = _project_t(q_head, tok, valid, H * K, 0, K, do, ds0 * decay, BKB, PREC)
        ds0 = _project_t(w_head, tok, valid, HV * K, 0, K, minus_dv_new, ds0, BKB, PREC)
        if K > BKB:
            ds1 = _project_t(q_head, tok, valid, H * K, 1, K, do, ds1 * decay, BKB, PREC)
            ds1 = _project_t(w_head, tok, valid, HV * K, 1, K, minus_dv_new, ds1, BKB, PREC)
        if K > 2 * BKB:
            ds2 = _project_t(q_head, tok, valid, H * K, 2, K, do, ds2 * decay, BKB, PREC)
            ds2 = _project_t(w_head, tok, valid, HV * K, 2, K, minus_dv_new, ds2, BKB, PREC)
        if K > 3 * BKB:
            ds3 = _project_t(q_head, tok, valid, H * K, 3, K, do, ds3 * decay, BKB, PREC)
            ds3 = _project_t(w_head, tok, valid, HV * K, 3, K, minus_dv_new, ds3, BKB, PREC)
    if STORE_DH0:
        _store_state(dh0_ptr + state_offset, rows_kb, cols_v, K, V, ds0)
        if K > BKB:
            _store_state(dh0_ptr + state_offset, BKB + rows_kb, cols_v, K, V, ds1)
        if K > 2 * BKB:
            _store_state(dh0_ptr + state_offset, 2 * BKB + rows_kb, cols_v, K, V, ds2)
        if K > 3 * BKB:
            _store_state(dh0_ptr + state_offset, 3 * BKB + rows_kb, cols_v, K, V, ds3)


@triton.jit
def _wy_bwd_kernel(k_ptr, v_ptr, beta_ptr, gcum_ptr, tm_ptr, h_ptr, dvnew_ptr, dv_ptr, dk_ptr, dbeta_ptr,
                   dgam_ptr, chunks_ptr,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr):
    """Per (chunk, value head), the gradients through V_new = U - W h with U = Tm diag(beta) V,
    W = Tm diag(beta exp(gamma)) K and Tm = (I + A)^-1. With dU = dV_new, dW = -dV_new h^T, X = Tm^T dV_new and
    K_in = diag(exp(gamma)) K:
        dv = diag(beta) X,   Tm^T dTm = X (diag(beta) V)^T - X h^T (diag(beta) K_in)^T,   dA = -Tm^T dTm Tm^T,
    so one pass over V blocks accumulates X h^T [BT, K] and X (diag(beta) V)^T [BT, BT] and everything else
    follows from them (K_in h is never formed). Stores dv, dbeta, and the partial dk (w.r.t. normalised k) and
    dgamma that `_qk_bwd_kernel` completes; on the rows after cu_seqlens[-1], zero dv and dbeta."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    DT = k_ptr.dtype.element_ty
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    rows = tl.arange(0, BT)
    rows_k = tl.arange(0, BK)
    tok = t0 + rows
    valid = tok < eos
    if kind == TAIL:
        _store_zero_rows(dv_ptr + hv * V, tok, valid, HV * V, V, BT, BV)
        tl.store(dbeta_ptr + tok * HV + hv, tl.full([BT], 0.0, tl.float32), mask=valid)
        return
    if kind < 0:
        return
    state_offset = (c.to(tl.int64) * HV + hv) * K * V

    beta = _load_head_scalar(beta_ptr, tok, valid, hv, HV)
    gam, _ = _load_gamma(gcum_ptr, tok, valid, hv, HV, rows, tl.minimum(eos - t0, BT) - 1)
    # Hopper miscompile fla #640 (Triton 3.4 to 3.7.1; the GPU image has 3.6): tl.trans of a tl.dot result cast to
    # 16 bits and fed to another tl.dot gives wrong dk / dbeta / dg. Here every tl.dot operand that is transposed
    # is a loaded tile, possibly scaled by rows (Tm, h, diag(beta) V, K, diag(beta exp(gamma)) K); products cast to
    # 16 bits (X, X h^T, Tm^T dTm, dA * Gamma * beta) only enter tl.dot as they are.
    tm_t = tl.trans(tl.load(tm_ptr + (tok * HV + hv)[:, None] * BT + rows[None, :],
                            mask=valid[:, None] & (rows[None, :] <= rows[:, None]), other=0.0).to(DT))

    x_h = tl.full([BT, BK], 0.0, tl.float32)  # X h^T
    x_v = tl.full([BT, BT], 0.0, tl.float32)  # X (diag(beta) V)^T
    dbeta = tl.full([BT], 0.0, tl.float32)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        s = _load_state(h_ptr + state_offset, rows_k, cols_v, K, V).to(DT)
        dv_new = _load_rows(dvnew_ptr + hv * V, tok, valid, HV * V, cols_v, V).to(DT)
        v = _load_rows(v_ptr + hv * V, tok, valid, HV * V, cols_v, V)
        x = tl.dot(tm_t, dv_new, input_precision=PREC)
        _store_rows(dv_ptr + hv * V, tok, valid, HV * V, cols_v, V, x * beta[:, None])
        dbeta += tl.reduce(x * v, 1, _ADD)
        x_h = tl.dot(x.to(DT), tl.trans(s), x_h, input_precision=PREC)
        x_v = tl.dot(x.to(DT), tl.trans((v * beta[:, None]).to(DT)), x_v, input_precision=PREC)

    # Through W: dbeta and dgamma take -rows of X . (K_in h) = -rows of (X h^T) . K_in, and
    # dk = -diag(beta exp(gamma)) X h^T (+ the A part below).
    k = _load_qk(k_ptr, tok, valid, h, H, K, rows_k)
    decay_in = tl.exp(gam)
    x_dot_kh = tl.reduce(x_h * k * decay_in[:, None], 1, _ADD)
    dbeta -= x_dot_kh
    dgam = -beta * x_dot_kh
    dk = x_h * (-beta * decay_in)[:, None]
    k = k.to(DT)
    k_in_beta = (k * (beta * decay_in)[:, None]).to(DT)
    tm_dtm = x_v - tl.dot(x_h.to(DT), tl.trans(k_in_beta), input_precision=PREC)  # Tm^T dTm

    # A_ij = beta_i k_i . k_j Gamma_ij (j < i).
    strict = rows[:, None] > rows[None, :]
    decay = tl.exp(tl.where(strict, gam[:, None] - gam[None, :], 0.0))
    da = tl.where(strict, -tl.dot(tm_dtm.to(DT), tm_t, input_precision=PREC), 0.0)
    da_a = da * tl.where(strict, tl.dot(k, tl.trans(k), input_precision=PREC) * decay, 0.0)
    dbeta += tl.reduce(da_a, 1, _ADD)
    da_a = da_a * beta[:, None]
    dgam += tl.reduce(da_a, 1, _ADD) - tl.reduce(da_a, 0, _ADD)
    # dk += M K + M^T K with M = dA * Gamma * beta_i. M^T K is formed as (K^T M)^T: its transpose is of an fp32
    # product that is only added and stored, never a 16-bit tl.dot operand (the fla #640 pattern).
    m = (da * decay * beta[:, None]).to(DT)
    dk = tl.dot(m, k, dk, input_precision=PREC)
    dk += tl.trans(tl.dot(tl.trans(k), m, input_precision=PREC))

    _store_rows(dk_ptr + hv * K, tok, valid, HV * K, rows_k, K, dk)
    tl.store(dbeta_ptr + tok * HV + hv, dbeta, mask=valid)
    tl.store(dgam_ptr + tok * HV + hv, dgam, mask=valid)


@triton.jit
def _qk_bwd_kernel(q_ptr, k_ptr, gcum_ptr, h_ptr, dh_ptr, vnew_ptr, do_ptr, dq_ptr, dk_ptr, dgam_ptr, dg_ptr,
                   chunks_ptr, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr):
    """Per (chunk, value head), the gradients through O = scale (diag(exp(gamma)) Q h + lower(Q K^T * Gamma) V_new)
    and S' = exp(gamma_last) h + (diag(exp(gamma_last - gamma)) K)^T V_new, added to the partial dk and dgamma of
    `_wy_bwd_kernel` (dk is read and overwritten in place). Finishes dq, dk (per value head, w.r.t. the normalised
    q, k) and dg (reverse cumsum of dgamma); zeros on the rows after cu_seqlens[-1]."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    DT = k_ptr.dtype.element_ty
    kind, t0, eos = _chunk_of_program(chunks_ptr, c)
    rows = tl.arange(0, BT)
    rows_k = tl.arange(0, BK)
    tok = t0 + rows
    valid = tok < eos
    if kind == TAIL:
        zeros = tl.full([BT, BK], 0.0, tl.float32)
        _store_rows(dq_ptr + hv * K, tok, valid, HV * K, rows_k, K, zeros)
        _store_rows(dk_ptr + hv * K, tok, valid, HV * K, rows_k, K, zeros)
        tl.store(dg_ptr + tok * HV + hv, tl.full([BT], 0.0, tl.float32), mask=valid)
        return
    if kind < 0:
        return
    last = tl.minimum(eos - t0, BT) - 1
    state_offset = (c.to(tl.int64) * HV + hv) * K * V

    q = _load_qk(q_ptr, tok, valid, h, H, K, rows_k).to(DT)
    k = _load_qk(k_ptr, tok, valid, h, H, K, rows_k).to(DT)
    gam, gam_last = _load_gamma(gcum_ptr, tok, valid, hv, HV, rows, last)
    decay_in = tl.exp(gam)
    decay_out = tl.where(valid, tl.exp(gam_last - gam), 0.0)

    dq = tl.full([BT, BK], 0.0, tl.float32)
    dk = tl.full([BT, BK], 0.0, tl.float32)
    do_vnew = tl.full([BT, BT], 0.0, tl.float32)  # dO V_new^T
    k_dot_end = tl.full([BT], 0.0, tl.float32)  # exp(gamma_last - gamma_i) k_i . (V_new dS^T)_i
    s_dot_ds = tl.full([BK], 0.0, tl.float32)  # <h, dS>, per row of K
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        s = _load_state(h_ptr + state_offset, rows_k, cols_v, K, V)
        ds = _load_state(dh_ptr + state_offset, rows_k, cols_v, K, V)
        s_dot_ds += tl.reduce(s * ds, 1, _ADD)
        ds = ds.to(DT)
        do = _load_rows(do_ptr + hv * V, tok, valid, HV * V, cols_v, V).to(DT)
        v_new = _load_rows(vnew_ptr + hv * V, tok, valid, HV * V, cols_v, V)
        dq = tl.dot(do, tl.trans(s.to(DT)), dq, input_precision=PREC)
        do_vnew = tl.dot(do, tl.trans(v_new.to(DT)), do_vnew, input_precision=PREC)
        # dk += diag(exp(gamma_last - gamma)) V_new dS^T (the row factors go on the left operand)
        k_dot_end += tl.reduce(v_new * tl.dot(k, ds, input_precision=PREC), 1, _ADD) * decay_out
        dk = tl.dot((v_new * decay_out[:, None]).to(DT), tl.trans(ds), dk, input_precision=PREC)

    # Inter-chunk part of O.
    dq = dq * (scale * decay_in)[:, None]
    dgam = tl.load(dgam_ptr + tok * HV + hv, mask=valid, other=0.0) + tl.reduce(dq * q.to(tl.float32), 1, _ADD)

    # Intra-chunk scores M = lower(Q K^T * Gamma), dM = scale dO V_new^T: dq += (dM * Gamma) K and
    # dk += (dM * Gamma)^T Q, formed as (Q^T (dM * Gamma))^T. Hopper miscompile fla #640 (wrong dk / dbeta / dg with
    # Triton 3.4 to 3.7.1) is tl.trans of a dot result cast to 16 bits and fed to another tl.dot: here the 16-bit
    # dM * Gamma enters both products untransposed, and the transposed result is fp32 and only added to dk.
    causal = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0))
    scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PREC) * decay, 0.0)
    dscores = tl.where(causal, do_vnew * scale, 0.0)
    ds_s = dscores * scores
    dgam += tl.reduce(ds_s, 1, _ADD) - tl.reduce(ds_s, 0, _ADD)
    dscores = (dscores * decay).to(DT)
    dq = tl.dot(dscores, k, dq, input_precision=PREC)
    dk += tl.trans(tl.dot(tl.trans(q), dscores, input_precision=PREC))

    # State update: the decay of h, and exp(gamma_last - gamma_i) on the rows of K.
    dgam -= k_dot_end
    dgam_last = tl.reduce(k_dot_end, 0, _ADD) + tl.exp(gam_last) * tl.reduce(s_dot_ds, 0, _ADD)
    dgam += tl.where(rows == last, dgam_last, 0.0)
    # gamma is a cumsum of g within the chunk, so dg is the reverse cumsum of dgamma.
    dg = tl.associative_scan(tl.where(valid, dgam, 0.0), 0, _ADD, reverse=True)
    tl.store(dg_ptr + tok * HV + hv, dg, mask=valid)

    dk += _load_rows(dk_ptr + hv * K, tok, valid, HV * K, rows_k, K)
    _store_rows(dq_ptr + hv * K, tok, valid, HV * K, rows_k, K, dq)
    _store_rows(dk_ptr + hv * K, tok, valid, HV * K, rows_k, K, dk)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _block_k(K):
    # tl.dot needs every dimension >= 16; the chunk-parallel kernels hold [64, K] tiles whole.
    return max(16, triton.next_power_of_2(K))


# V-block width of the loops over V inside the output and local-dv programs (one program per chunk and value head
# computes the masked, decayed Q K^T once and applies it to every V block). Offline sm_90 compiles at K = V = 128,
# bf16, Triton 3.9 / 3.6 (bench/sm90_report.py): the output kernel spills nothing at V blocks of 32, 64 and 128,
# 4 or 8 warps, 1 to 3 stages; at 64, 8 warps and 2 stages (129 / 120 registers, 72 KB shared memory) the
# second block's h and V_new tiles are prefetched with cp.async while the first is multiplied (at 128 there is no
# loop left to pipeline). Local dv takes V whole at 128 (one iteration).
_WIDE_BV = dict(output=64, local_dv=128)
# The backward's chunk-parallel kernels loop over V blocks accumulating [64, K] and [64, 64] tiles: the widest blocks
# without ptxas spills at K = V = 128 on sm_90 with Triton 3.9 and 3.6 (`_qk_bwd_kernel` spills 74 B at 64).
_WIDE_BV.update(wy_bwd=64, qk_bwd=32)


def _wide_block_v(kernel, V):
    return min(_WIDE_BV[kernel], max(16, triton.next_power_of_2(V)))


# Column-block width of `_wu_kernel`'s [64, 64] x [64, BW] products (W over K, U over V).
_WU_BLOCK = 64

# Launch configurations (fixed: no autotuning, which needs a GPU driver and would not run in the interpreter).
# Chosen from offline sm_90 compiles at K = V = 128, bf16, as the settings with the fewest ptxas spills; they
# are a starting point, not timed.
# Hopper traps: `_wy_bwd_kernel` must not run at 4 warps (fla #984 / #988: the WY backward at chunk 64 and 4 warps
# gives wrong dk / dbeta or an illegal access on sm_90); `_state_bwd_kernel` is the kernel fla PR #1262 saw
# miscompiled by ptxas 12.8 / 13.0 on Hopper, which tests/test_cuda.py checks with scale = 1 on a GPU.
_WARPS = dict(prepare=4, wu=4, output=8, local_dv=8, wy_bwd=8, qk_bwd=8)
_OUTPUT_STAGES = 2  # the output kernel's loop over V blocks (above)
assert _WARPS["wy_bwd"] != 4, "fla #984 / #988"
# The state walks (`_state_kernel`, `_state_bwd_kernel`), the same on Triton 3.9 and 3.6 (the GPU image's): 4 warps,
# the chunk loop software-pipelined at 2 stages (cp.async prefetch of the next chunk's tiles, which do not depend on
# the state). Offline sm_90 compiles at K = V = 128, bf16 (bench/sm90_report.py; BENCHMARKS.md, issue 11): 0 B
# spilled at 2 and 3 stages and V blocks of 16, 32 and 64 under both releases; 3 stages would take 115 / 173 KB
# of shared memory (forward / backward) against 78 / 115 KB at 2, for a loop that only needs the next chunk.
_WALK_WARPS = 4
_WALK_STAGES = 2
# V blocks of 32 give the walks V / 32 times more programs than sequences x value heads (4x at V = 128); a grid
# that would still have fewer programs than _WALK_MIN_PROGRAMS (about the SM count of an H100 / H200, 132) takes
# V blocks of 16 instead, e.g. one 4,096-token row of 16 heads: 128 programs instead of 64. Not timed yet.
_WALK_MIN_PROGRAMS = 128
# The state walks hold at most four 64-row state tiles.
MAX_HEAD_DIM_K = 256


def _walk_block_sizes(num_seqs, HV, K, V):
    """(BKB, BV) of the state walks: the height of their state tiles (64, or K rounded up to a power of two when
    smaller; K <= MAX_HEAD_DIM_K = 4 tiles) and their V-block width."""
    BV = min(32, max(16, triton.next_power_of_2(V)))
    if num_seqs * HV * triton.cdiv(V, BV) < _WALK_MIN_PROGRAMS:
        BV = 16
    return min(64, max(16, triton.next_power_of_2(K))), BV


# CUDA grids allow 2^31 - 1 programs on axis 0 but only 65,535 on axes 1 and 2: the axes that grow with the data
# (chunks; sequences x value heads) go on axis 0.
MAX_GRID_YZ = 65535


def launch_grid(*axes):
    """A launch grid, refused (with its sizes) if an axis other than the first passes MAX_GRID_YZ."""
    if any(n > MAX_GRID_YZ for n in axes[1:]):
        raise ValueError(f"grid {axes}: only axis 0 may have more than {MAX_GRID_YZ} programs")
    return axes


def sequence_starts(cu_seqlens, batch, seqlen, device):
    """cu_seqlens as int32 on `device` (possibly the same tensor), or [0, T, 2T, ...] for a fixed-length batch."""
    if cu_seqlens is None:
        return torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seqlen
    return cu_seqlens.to(device=device, dtype=torch.int32)


def chunk_layout(cu_seqlens, batch, seqlen, device):
    """(cu [N+1], chunk_offsets [N+1], chunks [NC, 3]) as int32 on `device`, for flattened tokens.

    chunk_offsets[n] is the index of the first chunk of sequence n; chunks[c] = (kind, first token, end token) of
    table entry c, kind being the sequence index for a chunk of a sequence, TAIL for a chunk of the rows after
    cu_seqlens[-1] (the rows a packed batch leaves unused: their outputs and gradients are written as zeros) and
    PADDING for the trailing entries of the static bound NC (ceil(T/64) + N for varlen: the tail counts as one
    more span). Pure device ops with static shapes: no host sync, traceable.
    """
    total = batch * seqlen
    cu = sequence_starts(cu_seqlens, batch, seqlen, device)
    if cu_seqlens is None:
        num_chunks_bound = batch * triton.cdiv(seqlen, CHUNK)
    else:
        num_chunks_bound = triton.cdiv(seqlen, CHUNK) + cu.shape[0] - 1
    num_seqs = cu.shape[0] - 1
    spans = torch.cat([cu, cu.new_full((1,), total)])  # the sequences, then the tail (empty without one)
    chunks_per_span = (spans[1:] - spans[:-1] + CHUNK - 1) // CHUNK
    span_offsets = torch.cat([cu.new_zeros(1), chunks_per_span.cumsum(0, dtype=torch.int32)])
    chunk_ids = torch.arange(num_chunks_bound, dtype=torch.int32, device=device)
    span = torch.searchsorted(span_offsets[1:], chunk_ids, right=True).to(torch.int32).clamp(max=num_seqs)
    first_token = spans[span] + (chunk_ids - span_offsets[span]) * CHUNK
    kind = torch.where(span == num_seqs, TAIL.value, span)
    kind = torch.where(chunk_ids < span_offsets[-1], kind, PADDING.value)
    chunks = torch.stack([kind, first_token, spans[span + 1]], 1).to(torch.int32)
    return cu, span_offsets[:-1].contiguous(), chunks.contiguous()


class _Problem:
    """Shapes, flattened contiguous inputs and launch constants shared by the forward and backward."""

    def __init__(self, q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm, layout=None, rstd=None):
        B, T, H, K = q.shape
        HV, V = v.shape[2:]
        if HV % H:
            raise ValueError(f"value heads ({HV}) must be a multiple of q/k heads ({H})")
        if K > MAX_HEAD_DIM_K:
            raise ValueError(f"the Triton chunked gated delta rule takes head sizes K <= {MAX_HEAD_DIM_K}, got K={K}")
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton gated delta rule takes fp16 / bf16 / fp32 q, k, v, got {dtype}")
        self.q, self.k, self.v = (x.to(dtype).reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v))
        # q and k are L2-normalised here, once, in fp32 and stored in the input dtype (the kernels, the state walks
        # included, read them as they are); their 1 / norms [B*T, H] are saved for the backward (`rstd` there).
        self.rstd = None
        if use_qk_l2norm:
            self.rstd = rstd or tuple(torch.rsqrt(x.float().square().sum(-1) + 1e-6) for x in (self.q, self.k))
            self.q, self.k = ((x.float() * r[..., None]).to(dtype) for x, r in zip((self.q, self.k), self.rstd))
        self.g, self.beta = (x.reshape(B * T, HV).contiguous() for x in (g, beta))
        self.B, self.T, self.H, self.HV, self.K, self.V = B, T, H, HV, K, V
        self.dtype = dtype
        self.scale = K ** -0.5 if scale is None else float(scale)
        self.cu, self.chunk_offsets, self.chunks = layout or chunk_layout(cu_seqlens, B, T, q.device)
        self.N = self.cu.shape[0] - 1
        self.NC = self.chunks.shape[0]
        self.BK = _block_k(K)
        # fp32 inputs get true fp32 matmuls (tf32 would cost ~1e-3 relative error); 16-bit ones use tensor cores.
        self.prec = "ieee" if dtype == torch.float32 else "tf32"

    def consts(self):
        return dict(H=self.H, HV=self.HV, K=self.K, V=self.V, BT=CHUNK, BK=self.BK, PREC=self.prec)

    def prepare(self):
        """gamma [B*T, HV] fp32; Tm [B*T, HV, 64], W [B*T, HV, K] and U [B*T, HV, V] in the input dtype (Tm is
        inverted in fp32 and only ever read as a matmul operand in the input dtype)."""
        tokens, HV = self.q.shape[0], self.HV
        gcum = torch.empty(tokens, HV, dtype=torch.float32, device=self.q.device)
        tm = torch.empty(tokens, HV, CHUNK, dtype=self.dtype, device=self.q.device)
        w = torch.empty(tokens, HV, self.K, dtype=self.dtype, device=self.q.device)
        u = torch.empty_like(self.v)
        grid = launch_grid(self.NC, HV)
        _prepare_kernel[grid](self.k, self.g, self.beta, gcum, tm, self.chunks, H=self.H, HV=HV, K=self.K, BT=CHUNK,
                              BC=SUB_CHUNK, BK=self.BK, PREC=self.prec, num_warps=_WARPS["prepare"])
        _wu_kernel[grid](self.k, self.v, self.beta, gcum, tm, w, u, self.chunks, H=self.H, HV=HV, K=self.K, V=self.V,
                         BT=CHUNK, BW=_WU_BLOCK, PREC=self.prec, num_warps=_WARPS["wu"])
        return gcum, tm, w, u

    def states(self, w, u, gcum, initial_state, store_final):
        """Per-chunk entry states h [NC, HV, K, V], V_new [B*T, HV, V], final state [N, HV, K, V] or None."""
        h = self.q.new_empty(self.NC, self.HV, self.K, self.V)
        v_new = torch.empty_like(self.v)
        final = (torch.empty(self.N, self.HV, self.K, self.V, dtype=torch.float32, device=self.q.device)
                 if store_final else None)
        h0 = initial_state.contiguous() if initial_state is not None else None
        BKB, BV = _walk_block_sizes(self.N, self.HV, self.K, self.V)
        _state_kernel[launch_grid(self.N * self.HV, triton.cdiv(self.V, BV))](
            self.k, w, u, gcum, h0, h, v_new, final, self.cu, self.chunk_offsets, H=self.H, HV=self.HV, K=self.K,
            V=self.V, BT=CHUNK, BKB=BKB, BV=BV, HAS_H0=h0 is not None, STORE_HT=store_final, PREC=self.prec,
            num_warps=_WALK_WARPS, num_stages=_WALK_STAGES)
        return h, v_new, final


def residual_shapes(batch, seqlen, H, HV, K, V, num_seqs=None, l2norm=False):
    """(shape, dtype) of the residuals the forward saves for the backward, dtype None for the input dtype:
    gamma, Tm, W, the chunk entry states h, V_new, the 1 / norms of q and k (empty without l2norm) and the chunk
    table (chunk_offsets, chunks) of `chunk_layout`, num_seqs given for a packed row. Static: they depend on the
    shapes of the inputs, not on cu_seqlens' values."""
    tokens = batch * seqlen
    if num_seqs is None:
        num_seqs, num_chunks_bound = batch, batch * triton.cdiv(seqlen, CHUNK)
    else:
        num_chunks_bound = triton.cdiv(seqlen, CHUNK) + num_seqs
    return [((tokens, HV), torch.float32), ((tokens, HV, CHUNK), None), ((tokens, HV, K), None),
            ((num_chunks_bound, HV, K, V), None), ((tokens, HV, V), None)] + \
        [((tokens, H) if l2norm else (0,), torch.float32)] * 2 + \
        [((num_seqs + 1,), torch.int32), ((num_chunks_bound, 3), torch.int32)]


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False):
    """Triton forward. Shapes as `kernels.chunk_gated_delta_rule`; returns (o [B, T, HV, V] in v's dtype,
    final state [N, HV, K, V] fp32 or None, the residuals of `residual_shapes` for the backward)."""
    p = _Problem(q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm)
    gcum, tm, w, u = p.prepare()
    h, v_new, final = p.states(w, u, gcum, initial_state, output_final_state)
    o = torch.empty(p.B * p.T, p.HV, p.V, dtype=v.dtype, device=v.device)
    _output_kernel[launch_grid(p.NC, p.HV)](p.q, p.k, gcum, h, v_new, o, p.chunks, p.scale,
                                            BV=_wide_block_v("output", p.V), **p.consts(),
                                            num_warps=_WARPS["output"], num_stages=_OUTPUT_STAGES)
    rstd = p.rstd or [q.new_empty(0, dtype=torch.float32) for _ in range(2)]
    return o.view(p.B, p.T, p.HV, p.V), final, [gcum, tm, w, h, v_new, *rstd, p.chunk_offsets, p.chunks]


def chunk_gated_delta_rule_bwd(do, dht, q, k, v, g, beta, residuals, scale=None, initial_state=None,
                               cu_seqlens=None, use_qk_l2norm=False):
    """Triton backward: gradients (dq, dk, dv, dg, dbeta, dh0) in the dtypes of their inputs (dh0 None without
    an initial state), given do [B, T, HV, V], dht (gradient of the final state, or None) and the residuals of
    the forward, from which nothing of the forward is recomputed."""
    gcum, tm, w, h, v_new, q_rstd, k_rstd, chunk_offsets, chunks = residuals
    cu = sequence_starts(cu_seqlens, q.shape[0], q.shape[1], q.device)
    p = _Problem(q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm, (cu, chunk_offsets, chunks),
                 (q_rstd, k_rstd) if use_qk_l2norm else None)
    do = do.to(p.dtype).reshape(p.B * p.T, p.HV, p.V).contiguous()
    tokens, HV, K, V = p.q.shape[0], p.HV, p.K, p.V

    dv_local = torch.empty_like(p.v)
    _local_dv_kernel[launch_grid(p.NC, HV)](p.q, p.k, gcum, do, dv_local, p.chunks, p.scale,
                                            BV=_wide_block_v("local_dv", V), **p.consts(),
                                            num_warps=_WARPS["local_dv"])

    dh = torch.empty_like(h)
    dv_new = torch.empty_like(p.v)
    dh0 = (torch.empty(initial_state.shape, dtype=torch.float32, device=q.device)
           if initial_state is not None else None)
    dht = dht.contiguous() if dht is not None else None
    BKB, walk_bv = _walk_block_sizes(p.N, HV, K, V)
    _state_bwd_kernel[launch_grid(p.N * HV, triton.cdiv(V, walk_bv))](
        p.q, p.k, w, gcum, do, dv_local, dht, dh, dv_new, dh0, p.cu, p.chunk_offsets, p.scale, H=p.H, HV=HV, K=K,
        V=V, BT=CHUNK, BKB=BKB, BV=walk_bv, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=p.prec,
        num_warps=_WALK_WARPS, num_stages=_WALK_STAGES)

    # dq, dk per value head in fp32 (the value heads of a group are summed below); dk and dgamma are started by
    # the WY part and finished by the q/k part.
    dq = torch.empty(tokens, HV, K, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(tokens, HV, V, dtype=v.dtype, device=v.device)
    dg = torch.empty(tokens, HV, dtype=torch.float32, device=q.device)
    dgam = torch.empty_like(dg)
    dbeta = torch.empty_like(dg)
    _wy_bwd_kernel[launch_grid(p.NC, HV)](p.k, p.v, p.beta, gcum, tm, h, dv_new, dv, dk, dbeta, dgam, p.chunks,
                                          BV=_wide_block_v("wy_bwd", V), **p.consts(), num_warps=_WARPS["wy_bwd"])
    _qk_bwd_kernel[launch_grid(p.NC, HV)](p.q, p.k, gcum, h, dh, v_new, do, dq, dk, dgam, dg, p.chunks, p.scale,
                                          BV=_wide_block_v("qk_bwd", V), **p.consts(), num_warps=_WARPS["qk_bwd"])
    group_shape = (p.B, p.T, p.H, HV // p.H, K)
    dq, dk = (d.view(group_shape).sum(3) for d in (dq, dk))
    if p.rstd:
        # Through x / ||x||: d raw = rstd (d normed - normed (normed . d normed)).
        normed = (x.view(dq.shape).float() for x in (p.q, p.k))
        dq, dk = ((d - x * (x * d).sum(-1, keepdim=True)) * r.view(*dq.shape[:3], 1)
                  for d, x, r in zip((dq, dk), normed, p.rstd))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.view(v.shape), dg.view(g.shape).to(g.dtype), dbeta.view(beta.shape).to(beta.dtype),
            dh0.to(initial_state.dtype) if dh0 is not None else None)
