"""Gated full attention: doubled q_proj (per-head query | gate), QK-norm before partial RoPE, GQA, sigmoid gate.

Packed rows (documents concatenated in one row, `cu_seqlens`) attend block-causally within each document, with
work and memory growing with the sum of the documents' squared lengths rather than the row's:
- a `BlockMask` (`document_block_mask`; CUDA): torch's flex_attention with a block mask built at 128-token block granularity
  from the document ids (no [T, T] tensor), compiled. Its shapes depend only on the row length, so a packing
  that changes from step to step reuses the compiled graph.
- `PackedDocuments` (CPU; torch's flex_attention has no CPU backward): the `qwen35::per_document_attention` op,
  torch's CPU flash-attention kernel run causally on each document (an opaque custom op: no graph break).
A dense bool [T, T] mask (`qwen35.model.packed_positions_and_mask`) remains the reference these are tested
against, and the mask of left-padded and cached decoding, which are not packed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import Qwen35Config
from .layers import RMSNorm, apply_rotary

FLEX_BLOCK_SIZE = 128  # flex_attention's default tile: the block mask's granularity

_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


class PackedDocuments(NamedTuple):
    """Document boundaries of a packed row for the per-document attention op: int32 [N+1], first 0, last T."""

    cu_seqlens: torch.Tensor


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """flex_attention block mask for a packed row: a query attends to earlier keys of its own document.
    document_ids [T] (non-decreasing). Built from per-block document ranges, O((T / 128)^2), no host sync."""
    seq_len = document_ids.shape[0]
    num_blocks = -(-seq_len // FLEX_BLOCK_SIZE)
    padded = F.pad(document_ids, (0, num_blocks * FLEX_BLOCK_SIZE - seq_len), value=-1).view(num_blocks, -1)
    first = padded[:, 0]
    last = padded.amax(-1)  # padding (-1) never exceeds a document id
    complete = padded.amin(-1) >= 0  # the block holds no position past the row's end
    lower = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=document_ids.device).tril()
    # Block (q, k), k <= q, holds a pair of one document iff key block k reaches query block q's first document.
    needed = lower & (last[None, :] >= first[:, None])
    single = (first == last) & complete
    full = needed & lower.tril(-1) & single[:, None] & single[None, :] & (first[:, None] == first[None, :])

    padded_ids = padded.flatten()  # indexable by every position of the last, partial block

    def mask_mod(batch, head, q_idx, kv_idx):
        return (padded_ids[q_idx] == padded_ids[kv_idx]) & (kv_idx <= q_idx)

    partial_num, partial_idx = _ordered_block_indices(needed & ~full)
    full_num, full_idx = _ordered_block_indices(full)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK_SIZE,
                                    mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def _ordered_block_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [Q blocks, KV blocks] -> (count [1, 1, Q], KV block indices [1, 1, Q, KV], the selected first)."""
    count = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None], indices[None, None]


def _lse_dtype(query: torch.Tensor) -> torch.dtype:
    """The CPU flash kernel's log-sum-exp dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


@torch.library.custom_op("qwen35::per_document_attention", mutates_args=(), device_types="cpu")
def per_document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document of a packed row. query/key/value [1, H, T, D] (equal head counts),
    cu_seqlens int32 [N+1]. Returns (output [1, H, T, D], log-sum-exp [1, H, T] fp32) for the backward."""
    out = torch.empty_like(query)
    lse = query.new_empty(query.shape[:3], dtype=_lse_dtype(query))
    bounds = cu_seqlens.tolist()  # CPU op: reading the boundaries costs no device sync
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            doc = slice(start, end)
            out[:, :, doc], lse[:, :, doc] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, doc], key[:, :, doc], value[:, :, doc], is_causal=True, scale=scale)
    return out, lse


@per_document_attention.register_fake
def _(query, key, value, cu_seqlens, scale):
    return torch.empty_like(query), query.new_empty(query.shape[:3], dtype=_lse_dtype(query))


@torch.library.custom_op("qwen35::per_document_attention_backward", mutates_args=(), device_types="cpu")
def per_document_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                    cu_seqlens: torch.Tensor, scale: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = [torch.zeros_like(t) for t in (query, key, value)]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            doc = slice(start, end)
            doc_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, :, doc], query[:, :, doc], key[:, :, doc], value[:, :, doc], out[:, :, doc],
                lse[:, :, doc], 0.0, True, scale=scale)
            for grad, doc_grad in zip(grads, doc_grads):
                grad[:, :, doc] = doc_grad
    return tuple(grads)


@per_document_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, cu_seqlens, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _per_document_attention_setup(ctx, inputs, output):
    query, key, value, cu_seqlens, scale = inputs
    ctx.save_for_backward(query, key, value, *output, cu_seqlens)
    ctx.scale = scale


def _per_document_attention_grad(ctx, grad_out, grad_lse):
    query, key, value, out, lse, cu_seqlens = ctx.saved_tensors
    grads = per_document_attention_backward(grad_out.contiguous(), query, key, value, out, lse, cu_seqlens,
                                            ctx.scale)
    return *grads, None, None


per_document_attention.register_autograd(_per_document_attention_grad, setup_context=_per_document_attention_setup)


def in_attention_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """query, key, value in one dtype, as F.scaled_dot_product_attention gets them: autocast's (an autocast region
    does not cast for the flash and flex kernels), else the promoted one (RoPE in fp32 may have promoted q and k)."""
    device = query.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype))
    return query.to(dtype), key.to(dtype), value.to(dtype)


def packed_document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              documents: BlockMask | PackedDocuments) -> torch.Tensor:
    """Block-causal attention within the documents of a packed row; query [1, H, T, D], key/value [1, Hkv, T, D]
    (with a BlockMask, the keys may be more than the queries: T_k as the mask's KV length)."""
    query, key, value = in_attention_dtype(query, key, value)
    enable_gqa = query.shape[1] != key.shape[1]
    if isinstance(documents, BlockMask):
        return _compiled_flex_attention(query, key, value, block_mask=documents, enable_gqa=enable_gqa)
    if enable_gqa:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out, _ = per_document_attention(query.contiguous(), key.contiguous(), value.contiguous(),
                                    documents.cu_seqlens, query.shape[-1] ** -0.5)
    return out


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, is_causal: bool = False,
           enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, except that a packed row's documents (a BlockMask or PackedDocuments as
    attn_mask) take the per-document path."""
    if isinstance(attn_mask, (BlockMask, PackedDocuments)):
        return packed_document_attention(query, key, value, attn_mask)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=enable_gqa)


class GatedAttention(nn.Module):
    # The attention core, F.scaled_dot_product_attention's signature (parallelism.context_parallel replaces it
    # per module with attention over the keys of every rank).
    attention_kernel = staticmethod(attend)

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | BlockMask | PackedDocuments | None = None, kv_cache=None) -> torch.Tensor:
        """x [B, T, hidden]; attn_mask: None for plain causal attention, a bool [B or 1, 1, T, keys] (True =
        attend), or the documents of a packed row (B == 1: a `BlockMask` or `PackedDocuments`); kv_cache: a
        `KVCache` whose `update` returns all keys/values so far."""
        B, T, _ = x.shape
        # q_proj rows are laid out per head as [query (D) | gate (D)].
        query, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, self.num_heads * self.head_dim)
        query = apply_rotary(self.q_norm(query), cos, sin).transpose(1, 2)
        key = apply_rotary(self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)), cos, sin)
        key = key.transpose(1, 2)
        value = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            key, value = kv_cache.update(key, value)
        out = self.attention_kernel(query, key, value, attn_mask=attn_mask, is_causal=attn_mask is None,
                                    enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate))
