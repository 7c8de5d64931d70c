"""Context parallelism: one packed row of T tokens split over the C ranks of a process group, every sequence mixer
exact across the split (no new delta-rule kernel).

Layout (load balance): the row is cut into 2C chunks of T / 2C tokens and rank r holds chunks r and 2C - 1 - r (the
"zig-zag" / torchtitan head-tail layout), one early and one late chunk, so each rank's causal attention work is about
the same. The whole model runs on this layout: Gated DeltaNet treats the rank's two chunks as two segments (a
segment boundary is a sequence boundary for the local kernels, and each segment gets its incoming state from the
scan below), so no token is permuted between the attention and GDN layers. What the layout costs GDN: two (M, U)
per rank in the all-gather instead of one, a scan over 2C chunks (2C small matrix products per head), and one more
sequence split in the local kernels (at most one more partial 64-token kernel chunk). Permuting tokens to a zig-zag
attention layout and back instead would move every hidden state through an all-to-all twice per attention layer in
each direction.

- Gated DeltaNet's delta rule. The recurrence S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T acts on
  each value column of S independently and linearly, so one call of `kernels.chunk_gated_delta_rule` with the values
  augmented to [v | 0_K] and each segment's first sequence starting from [0 | I_K] returns, at once, the outputs
  from a zero incoming state, their linear map of the incoming state (the identity columns: o = o_zero + P S_in),
  and each segment's final state [U | M] with S_out = M S_in + U. The ranks all-gather their two (M, U) and each
  scans the 2C chunks in order for its segments' incoming states; a document boundary at a chunk's start resets the
  chain, and one inside a chunk does so by itself (that sequence starts from [0 | 0], so its M is 0).
- The causal conv: each segment receives the previous chunk's last W - 1 pre-conv inputs (those of the document
  that continues across the boundary; zeros for earlier documents) as the initial conv state of its first sequence.
- Attention: keys and values (after norm and RoPE) are all-gathered and the local queries attend to them
  block-causally within their documents, without a dense mask: on CPU, torch's flash kernel on the (query range,
  key range) tiles of each document (the tiles before the queries unmasked, the diagonal one causal) with their
  outputs merged by log-sum-exp; on CUDA (or with the model's packed_attention = "flex"), flex_attention with a block
  mask of local queries x gathered keys.
All-gathers are functional collectives (their backward is a reduce-scatter), so compiled blocks hold them in-graph.

qwen35's mixers call these through their `sequence_kernels` (GatedDeltaNet) and `attention_kernel`
(GatedAttention) attributes, which `apply_context_parallel` points at a `ContextParallel`; `ContextParallel.shard`
takes each batch's document boundaries before the model's forward, and `ContextParallelShard.take` selects the
rank's tokens of every [B, T, ...] input (ids, labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

import kernels
from qwen35 import Qwen35ForCausalLM
from qwen35.attention import FLEX_BLOCK_SIZE, GatedAttention, in_attention_dtype, packed_document_attention
from qwen35.gated_deltanet import GatedDeltaNet


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The ranks' equally shaped tensors concatenated along dim 0 in rank order; differentiable (the backward
    reduce-scatters), and traceable by torch.compile. Every rank must use the result in its loss (a use that
    multiplies it by zero counts), or the backward's reduce-scatter is not reached on every rank."""
    # Waited at once (a plain tensor, not an AsyncCollectiveTensor): every use follows right away.
    return funcol.wait_tensor(funcol.all_gather_single_autograd(x.contiguous(), 0, group))


@dataclass(frozen=True)
class ContextParallelShard:
    """One batch's split: this rank's two chunks of a packed row of `seq_len` tokens, what the trainer feeds the
    model and what the sequence ops read. The tensor fields are read inside (compiled) blocks: their values change
    per batch without a recompile; the Python fields are read on the host only."""

    rank: int
    size: int
    seq_len: int
    chunk: int  # tokens per chunk: seq_len / (2 size)
    segments: tuple[tuple[int, int], tuple[int, int]]  # the global [start, end) of chunks rank and 2 size - 1 - rank
    cu_seqlens: torch.Tensor  # int32: the local sequences' boundaries; 0, chunk (between the segments), 2 chunk too
    position_ids: torch.Tensor  # [1, 2 chunk]: positions within each document (they continue across chunks)
    segment_first_sequence: torch.Tensor  # int64 [2]: the local sequence each segment starts with
    segment_last_sequence: torch.Tensor  # int64 [2]: the local sequence each segment ends with
    continues: torch.Tensor  # fp32 [2 size]: 1 where chunk c's first token is in the document of chunk c - 1's last
    halo_valid: torch.Tensor  # bool [2, MAX_CONV_WIDTH - 1]: which positions before each segment are in its document
    # The attention's document structure, one of the two (ContextParallel.packed_attention). "per_document": int64
    # [n, 5] tiles (query start, query end) local, (key start, key end) in the gathered keys, causal. "flex": a
    # flex block mask of the local queries x the gathered keys.
    attention_tiles: torch.Tensor | None
    attention_block_mask: BlockMask | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a [B, seq_len, ...] tensor: its two chunks, concatenated."""
        (a0, b0), (a1, b1) = self.segments
        return torch.cat([x[:, a0:b0], x[:, a1:b1]], dim=1)


def chunks_of_rank(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


def rank_positions(rank: int, size: int, chunk: int, device=None) -> torch.Tensor:
    """The global positions of a rank's tokens, in its local order (its two chunks)."""
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunks_of_rank(rank, size)])


def gathered_positions(size: int, chunk: int, device=None) -> torch.Tensor:
    """The global positions of an all-gather of every rank's tokens (rank-major)."""
    return torch.cat([rank_positions(r, size, chunk, device) for r in range(size)])


def gathered_chunk_slot(chunk_index: int, size: int) -> int:
    """Where chunk `chunk_index` lies in an all-gather of every rank's (first chunk, second chunk)."""
    return 2 * chunk_index if chunk_index < size else 2 * (2 * size - 1 - chunk_index) + 1


def attention_tiles(bounds: list[int], chunk_indices: tuple[int, ...], chunk: int, key_slot
                    ) -> list[tuple[int, int, int, int, int]]:
    """The (query range, key range, causal) tiles of block-causal document attention for the queries of the chunks
    `chunk_indices` (in local order): per document and chunk, the queries attend without a mask to the document's
    keys in each earlier chunk, and causally to the keys of their own range. A chunk c's keys lie at
    key_slot(c) x chunk in the gathered keys."""
    tiles = []
    for local_offset, chunk_index in zip(range(0, len(chunk_indices) * chunk, chunk), chunk_indices):
        start, end = chunk_index * chunk, (chunk_index + 1) * chunk
        for doc_start, doc_end in zip(bounds, bounds[1:]):
            q0, q1 = max(doc_start, start), min(doc_end, end)
            if q0 >= q1:
                continue
            local = (q0 - start + local_offset, q1 - start + local_offset)
            earlier_keys = []  # the document's keys in earlier chunks, in gathered coordinates
            for earlier in range(doc_start // chunk, chunk_index):
                offset = (key_slot(earlier) - earlier) * chunk
                earlier_keys.append([max(doc_start, earlier * chunk) + offset, (earlier + 1) * chunk + offset])
            for k0, k1 in _coalesced(earlier_keys):
                tiles.append((*local, k0, k1, 0))
            offset = (key_slot(chunk_index) - chunk_index) * chunk
            tiles.append((*local, q0 + offset, q1 + offset, 1))
    return tiles


def _coalesced(ranges: list[list[int]]) -> list[list[int]]:
    """Key ranges with the adjacent ones joined (one flash call instead of two)."""
    joined = []
    for k0, k1 in sorted(ranges):
        if joined and joined[-1][1] == k0:
            joined[-1][1] = k1
        else:
            joined.append([k0, k1])
    return joined


def attention_work(tiles: list[tuple[int, int, int, int, int]]) -> int:
    """Query-key pairs the tiles score (a causal tile its lower triangle): the attention FLOPs up to a factor."""
    return sum((q1 - q0) * (q1 - q0 + 1) // 2 if causal else (q1 - q0) * (k1 - k0)
               for q0, q1, k0, k1, causal in tiles)


def _padded_to_blocks(values: torch.Tensor, pad: int) -> torch.Tensor:
    """`values` padded with `pad` to whole FLEX_BLOCK_SIZE blocks (flex evaluates mask_mod on a last, partial
    block's every position)."""
    blocks = -(-values.shape[0] // FLEX_BLOCK_SIZE)
    return F.pad(values, (0, blocks * FLEX_BLOCK_SIZE - values.shape[0]), value=pad)


def _block_ranges(padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per FLEX_BLOCK_SIZE block of `padded` (entries >= 0, padding < 0): (min, max) of its entries."""
    blocks = padded.view(-1, FLEX_BLOCK_SIZE)
    return blocks.masked_fill(blocks < 0, torch.iinfo(padded.dtype).max).amin(-1), blocks.amax(-1)


def gathered_keys_block_mask(document_ids: torch.Tensor, rank: int, size: int, chunk: int) -> BlockMask:
    """The block mask of a rank's queries x the gathered keys, from the row's document ids [T]."""
    queries = rank_positions(rank, size, chunk, document_ids.device)
    keys = gathered_positions(size, chunk, document_ids.device)
    return cross_block_mask(document_ids[queries], queries, document_ids[keys], keys)


def cross_block_mask(q_doc: torch.Tensor, q_pos: torch.Tensor, k_doc: torch.Tensor, k_pos: torch.Tensor
                     ) -> BlockMask:
    """flex_attention block mask of queries x keys given by their document ids and global positions (any order):
    a query attends to keys of its document at or before its position. Blocks are kept where their ranges overlap
    (a superset; mask_mod decides inside them)."""
    # Padding: query documents -1, key documents -2 (a padded position pairs with nothing), positions -1.
    q_doc_padded, k_doc_padded = _padded_to_blocks(q_doc, -1), _padded_to_blocks(k_doc, -2)
    q_pos_padded, k_pos_padded = _padded_to_blocks(q_pos, -1), _padded_to_blocks(k_pos, -1)
    (q_doc_lo, q_doc_hi), (k_doc_lo, k_doc_hi) = _block_ranges(q_doc_padded), _block_ranges(k_doc_padded)
    (q_pos_lo, q_pos_hi), (k_pos_lo, k_pos_hi) = _block_ranges(q_pos_padded), _block_ranges(k_pos_padded)
    needed = ((k_pos_lo[None, :] <= q_pos_hi[:, None]) & (k_doc_lo[None, :] <= q_doc_hi[:, None])
              & (k_doc_hi[None, :] >= q_doc_lo[:, None]))
    q_single = (q_doc_lo == q_doc_hi) & (q_doc_padded.view(-1, FLEX_BLOCK_SIZE) >= 0).all(-1)
    k_single = (k_doc_lo == k_doc_hi) & (k_doc_padded.view(-1, FLEX_BLOCK_SIZE) >= 0).all(-1)
    full = (needed & q_single[:, None] & k_single[None, :] & (q_doc_lo[:, None] == k_doc_lo[None, :])
            & (k_pos_hi[None, :] <= q_pos_lo[:, None]))

    def mask_mod(batch, head, q_idx, kv_idx):
        return ((q_doc_padded[q_idx] == k_doc_padded[kv_idx])
                & (k_pos_padded[kv_idx] <= q_pos_padded[q_idx]))

    def ordered(blocks):  # bool [Q blocks, KV blocks] -> (count [1, 1, Q], KV block indices, the selected first)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return blocks.sum(-1, dtype=torch.int32)[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(*ordered(needed & ~full), *ordered(full), BLOCK_SIZE=FLEX_BLOCK_SIZE,
                                    mask_mod=mask_mod, seq_lengths=(q_doc.shape[0], k_doc.shape[0]))


def _lse_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


@torch.library.custom_op("qwen35_cp::tiled_attention", mutates_args=(), device_types="cpu")
def tiled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tiles: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """query [1, H, Tq, D], key/value [1, Hkv, Tk, D]; tiles int64 [n, 5] (query start/end, key start/end,
    causal), every query row covered. Returns (output [1, H, Tq, D], log-sum-exp [1, H, Tq]): each tile by torch's
    CPU flash kernel, merged by log-sum-exp."""
    heads = query.shape[1]
    out = query.new_zeros(query.shape, dtype=_lse_dtype(query))
    lse = query.new_full(query.shape[:3], float("-inf"), dtype=_lse_dtype(query))
    for q0, q1, k0, k1, causal in tiles.tolist():  # CPU op: reading the tiles costs no device sync
        tile_out, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, q0:q1].contiguous(), _repeat_heads(key[:, :, k0:k1], heads).contiguous(),
            _repeat_heads(value[:, :, k0:k1], heads).contiguous(), is_causal=bool(causal), scale=scale)
        merged = torch.logaddexp(lse[:, :, q0:q1], tile_lse)
        out[:, :, q0:q1] = (out[:, :, q0:q1] * (lse[:, :, q0:q1] - merged).exp()[..., None]
                            + tile_out * (tile_lse - merged).exp()[..., None])
        lse[:, :, q0:q1] = merged
    return out.to(query.dtype), lse


@tiled_attention.register_fake
def _(query, key, value, tiles, scale):
    return torch.empty_like(query), query.new_empty(query.shape[:3], dtype=_lse_dtype(query))


@torch.library.custom_op("qwen35_cp::tiled_attention_backward", mutates_args=(), device_types="cpu")
def tiled_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, tiles: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each tile's flash backward with the merged output and log-sum-exp (its probabilities are then the tile's
    share of the whole row's softmax), summed."""
    heads, kv_heads = query.shape[1], key.shape[1]
    grad_query = torch.zeros_like(query)
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for q0, q1, k0, k1, causal in tiles.tolist():
        rows = slice(q0, q1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out[:, :, rows].contiguous(), query[:, :, rows].contiguous(),
            _repeat_heads(key[:, :, k0:k1], heads).contiguous(), _repeat_heads(value[:, :, k0:k1], heads).contiguous(),
            out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), 0.0, bool(causal), scale=scale)
        grad_query[:, :, rows] += dq
        grad_key[:, :, k0:k1] += dk.unflatten(1, (kv_heads, -1)).sum(2)
        grad_value[:, :, k0:k1] += dv.unflatten(1, (kv_heads, -1)).sum(2)
    return grad_query, grad_key, grad_value


@tiled_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, tiles, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _tiled_attention_setup(ctx, inputs, output):
    query, key, value, tiles, scale = inputs
    ctx.save_for_backward(query, key, value, *output, tiles)
    ctx.scale = scale


def _tiled_attention_grad(ctx, grad_out, grad_lse):
    query, key, value, out, lse, tiles = ctx.saved_tensors
    return *tiled_attention_backward(grad_out, query, key, value, out, lse, tiles, ctx.scale), None, None


tiled_attention.register_autograd(_tiled_attention_grad, setup_context=_tiled_attention_setup)


class ContextParallel:
    """The context-parallel sequence ops of one process group, with the signatures of the single-process ones
    (`kernels.causal_conv1d`, `kernels.chunk_gated_delta_rule`, `F.scaled_dot_product_attention`), applied to the
    split set by the last `shard` call."""

    # Conv windows up to this width get their halo from the previous chunk (Qwen3.5's is 4).
    MAX_CONV_WIDTH = 8

    def __init__(self, group: dist.ProcessGroup, packed_attention: str = "auto"):
        """packed_attention: as the model's (`Qwen35ForCausalLM.packed_attention`): "flex" (the block mask),
        "per_document" (the CPU flash tiles) or "auto" (flex on CUDA, else the tiles); no "dense"."""
        if packed_attention not in ("auto", "flex", "per_document"):
            raise ValueError(f"context parallelism: packed_attention = {packed_attention!r}; expected 'auto', "
                             "'flex' or 'per_document' (it has no dense-mask attention)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.packed_attention = packed_attention
        self.current: ContextParallelShard | None = None

    def shard(self, cu_seqlens: torch.Tensor, seq_len: int) -> ContextParallelShard:
        """Split a packed row of `seq_len` tokens with document boundaries `cu_seqlens` ([N + 1], 0 and seq_len
        included) into this rank's two chunks; make it the split the ops work on and return it. Feed the model
        `shard.take(ids)` with `position_ids` and `cu_seqlens` of the shard."""
        size, rank = self.size, self.rank
        if seq_len % (2 * size):
            raise ValueError(f"context parallelism: the sequence length {seq_len} must be divisible by 2 x the "
                             f"context-parallel degree = {2 * size} (each rank holds two chunks of "
                             f"seq_len / {2 * size} tokens)")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != seq_len or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"context parallelism: cu_seqlens must rise strictly from 0 to the sequence length "
                             f"{seq_len}, got {bounds}")
        chunk = seq_len // (2 * size)
        if chunk < self.MAX_CONV_WIDTH - 1:
            raise ValueError(f"context parallelism: each chunk's {chunk} tokens (seq_len / {2 * size}) must cover a "
                             f"conv window ({self.MAX_CONV_WIDTH - 1} tokens); use a longer sequence or a smaller "
                             "degree")
        device = cu_seqlens.device
        segments = tuple((c * chunk, (c + 1) * chunk) for c in chunks_of_rank(rank, size))
        local_bounds, first, last = [0], [], []
        for offset, (start, end) in zip((0, chunk), segments):
            first.append(len(local_bounds) - 1)
            local_bounds += [b - start + offset for b in bounds if start < b < end] + [offset + chunk]
            last.append(len(local_bounds) - 2)
        halo_rows = torch.arange(-(self.MAX_CONV_WIDTH - 1), 0, device=device)
        halo_valid = torch.stack([start + halo_rows >= max(b for b in bounds if b <= start)
                                  for start, _ in segments])
        idx = torch.arange(seq_len, device=device)
        boundaries = torch.tensor(bounds, device=device)
        doc = torch.searchsorted(boundaries[1:], idx, right=True)
        document_positions = idx - boundaries[doc]
        tiles, block_mask = None, None
        if self.packed_attention == "flex" or (self.packed_attention == "auto" and device.type == "cuda"):
            block_mask = gathered_keys_block_mask(doc, rank, size, chunk)
        else:
            tiles = torch.tensor(attention_tiles(bounds, chunks_of_rank(rank, size), chunk,
                                                 lambda c: gathered_chunk_slot(c, size)), dtype=torch.int64)
        self.current = ContextParallelShard(
            rank=rank, size=size, seq_len=seq_len, chunk=chunk, segments=segments,
            cu_seqlens=torch.tensor(local_bounds, dtype=torch.int32, device=device),
            position_ids=document_positions[rank_positions(rank, size, chunk, device)][None],
            segment_first_sequence=torch.tensor(first, device=device),
            segment_last_sequence=torch.tensor(last, device=device),
            continues=torch.tensor([float(c > 0 and c * chunk not in bounds) for c in range(2 * size)],
                                   device=device),
            halo_valid=halo_valid,
            attention_tiles=tiles,
            attention_block_mask=block_mask,
        )
        return self.current

    def _current_shard(self) -> ContextParallelShard:
        if self.current is None:
            raise RuntimeError("context parallelism: call ContextParallel.shard(cu_seqlens, seq_len) before the "
                               "model's forward")
        return self.current

    def _shard_for(self, x, cu_seqlens, initial_state, output_final_state) -> ContextParallelShard:
        shard = self._current_shard()
        if x.shape[0] != 1 or x.shape[1] != 2 * shard.chunk or cu_seqlens is not shard.cu_seqlens:
            raise ValueError(f"context parallelism: the model must get one row of this rank's {2 * shard.chunk} "
                             "tokens (shard.take) with cu_seqlens=shard.cu_seqlens of the current "
                             "ContextParallel.shard")
        if initial_state is not None or output_final_state:
            raise ValueError("context parallelism does not carry caller states (decoding caches)")
        return shard

    def _chunks_in_order(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """An all-gather of every rank's (first chunk, second chunk) entries, as a list in chunk order."""
        return [gathered[gathered_chunk_slot(c, self.size)] for c in range(2 * self.size)]

    def causal_conv1d(self, x, weight, initial_state=None, output_final_state=False, cu_seqlens=None,
                      activation="silu"):
        shard = self._shard_for(x, cu_seqlens, initial_state, output_final_state)
        W = weight.shape[1]
        if W > self.MAX_CONV_WIDTH:
            raise ValueError(f"context parallelism supports conv widths up to {self.MAX_CONV_WIDTH}, got {W}")
        rows, chunk = W - 1, shard.chunk
        tails = all_gather(torch.stack([x[0, chunk - rows:chunk], x[0, 2 * chunk - rows:]]), self.group)
        tails = self._chunks_in_order(tails)  # [W - 1, C] per chunk
        halos = []
        for segment, chunk_index in enumerate(chunks_of_rank(self.rank, self.size)):
            if chunk_index == 0:
                halos.append(torch.zeros_like(tails[0]))
            else:
                halos.append(tails[chunk_index - 1] * shard.halo_valid[segment, -rows:, None].to(x.dtype))
        # The conv state is the last W inputs before t = 0 (its oldest row is never used).
        first_states = F.pad(torch.stack(halos).transpose(1, 2), (1, 0))
        states = first_states.new_zeros(cu_seqlens.shape[0] - 1, x.shape[2], W)
        states = states.index_copy(0, shard.segment_first_sequence, first_states)
        y, _ = kernels.causal_conv1d(x, weight, initial_state=states, cu_seqlens=cu_seqlens, activation=activation)
        return y, None

    def chunk_gated_delta_rule(self, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, backend=None):
        shard = self._shard_for(v, cu_seqlens, initial_state, output_final_state)
        B, T, HV, V = v.shape
        K = q.shape[-1]
        state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        identity = torch.eye(K, dtype=state_dtype, device=v.device).expand(2, HV, K, K)
        s0 = torch.zeros(cu_seqlens.shape[0] - 1, HV, K, V + K, dtype=state_dtype, device=v.device)
        s0 = s0.index_copy(0, shard.segment_first_sequence, F.pad(identity, (V, 0)))
        o_aug, final = kernels.chunk_gated_delta_rule(
            q, k, torch.cat([v, v.new_zeros(B, T, HV, K)], -1), g, beta, scale=scale, initial_state=s0,
            output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend)
        o_zero, through = o_aug.split([V, K], dim=-1)

        # Every chunk's [U | M]; the scan over the chunks in order gives each chunk's incoming state.
        transitions = self._chunks_in_order(all_gather(final[shard.segment_last_sequence], self.group))
        wanted = chunks_of_rank(self.rank, self.size)
        incoming = {0: torch.zeros_like(transitions[0][..., :V])}
        for c in range(1, max(wanted) + 1):
            outgoing, transition = transitions[c - 1].split([V, K], dim=-1)
            incoming[c] = shard.continues[c] * (transition @ incoming[c - 1] + outgoing)
        s_in = torch.stack([incoming[c] for c in wanted])  # [2, HV, K, V]
        through = through.to(state_dtype).unflatten(1, (2, shard.chunk))
        from_incoming = torch.einsum("bsthk,shkv->bsthv", through, s_in).flatten(1, 2)
        return (o_zero.to(state_dtype) + from_incoming).to(v.dtype), None

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, is_causal=False, enable_gqa=False):
        """query [1, H, T_local, D], key/value [1, H_kv, T_local, D]; attn_mask/is_causal (the single-process
        mask) are replaced by the shard's block-causal attention over the gathered keys."""
        shard = self._current_shard()
        query, key, value = in_attention_dtype(query, key, value)
        keys, values = (all_gather(x.transpose(0, 2), self.group).transpose(0, 2) for x in (key, value))
        if shard.attention_block_mask is not None:
            return packed_document_attention(query, keys, values, shard.attention_block_mask)
        out, _ = tiled_attention(query.contiguous(), keys, values, shard.attention_tiles, query.shape[-1] ** -0.5)
        return out


def apply_context_parallel(model: Qwen35ForCausalLM, group: dist.ProcessGroup) -> ContextParallel:
    """Route every mixer's sequence ops through one `ContextParallel` of `group` and return it; the caller shards
    each batch with it before the forward. Parameters are untouched: their gradients are partial sums over the
    group's ranks, to be summed over the group (FSDP over a mesh that includes it, or an all-reduce). The attention
    follows the model's `packed_attention` ("dense" is refused)."""
    cp = ContextParallel(group, model.packed_attention)
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.sequence_kernels = cp
        elif isinstance(module, GatedAttention):
            module.attention_kernel = cp.scaled_dot_product_attention
    return cp
