"""Context parallelism: one packed row of T tokens split into C consecutive slices of T / C tokens, one per rank
of a process group, with every sequence mixer exact across the slices (no new kernel):

- Gated DeltaNet's delta rule. The recurrence S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T acts on
  each value column of S independently and linearly, so one call of `kernels.chunk_gated_delta_rule` with the values
  augmented to [v | 0_K] and the first local sequence's initial state [0 | I_K] returns, at once, the outputs from a
  zero incoming state, the outputs' linear map of the incoming state (the identity columns: o = o_zero + P S_in),
  and the rank's final state [U | M] with S_out = M S_in + U. The ranks all-gather (M, U) of their last local
  sequence and each scans the earlier ranks' pairs for its incoming state; a document boundary at a rank's start
  resets the chain, and one inside a rank does so by itself (that sequence starts from [0 | 0], so its M is 0).
  Gradients reach every rank's (M, U) through the autograd all-gather.
- The causal conv: each rank receives the previous rank's last W - 1 pre-conv inputs (those of the document that
  continues across the boundary; zeros for earlier documents) as the initial conv state of its first sequence.
- Attention: all-gather attention. Keys and values (after norm and RoPE) are gathered over the group and the local
  queries attend to all T keys under the block-causal document mask. No load balancing: the last rank does the
  most work, and every rank holds the full sequence's keys and values of one layer at a time.

qwen35's mixers call these through their `sequence_kernels` (GatedDeltaNet) and `attention_kernel`
(GatedAttention) attributes, which `apply_context_parallel` points at a `ContextParallel`; `ContextParallel.shard`
slices each batch (ids, labels, positions, cu_seqlens) and must be called before the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from qwen35 import Qwen35ForCausalLM
from qwen35.attention import GatedAttention
from qwen35.gated_deltanet import GatedDeltaNet


class _GatherThenSelect(torch.autograd.Function):
    """select(concatenation along dim 0 of every rank's equally shaped tensor). The backward differentiates
    `select` locally and reduce-scatters the gradients of the concatenation, so every rank joins the collective
    of the backward even where its `select` ignores the gathered values (a rank that receives no state)."""

    @staticmethod
    def forward(ctx, x, group, select):
        gathered = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(gathered, x.contiguous(), group=group)
        ctx.group, ctx.select = group, select
        ctx.save_for_backward(gathered)
        return select(gathered)

    @staticmethod
    def backward(ctx, grad_out):
        (gathered,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gathered.detach().requires_grad_()
            out = ctx.select(leaf)
            grad_gathered = (torch.autograd.grad(out, leaf, grad_out)[0] if out.requires_grad
                             else torch.zeros_like(gathered))
        grad = grad_out.new_empty((gathered.shape[0] // dist.get_world_size(ctx.group), *gathered.shape[1:]))
        dist.reduce_scatter_single(grad, grad_gathered.contiguous(), group=ctx.group)
        return grad, None, None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 0, select=_identity) -> torch.Tensor:
    """Autograd-aware all-gather: select(the ranks' tensors concatenated along `dim` in rank order). Every rank
    must use the result in its loss (a select that ignores the gathered values is fine), or the backward's
    reduce-scatter is not reached on every rank."""
    return _GatherThenSelect.apply(x.movedim(dim, 0), group, lambda gathered: select(gathered.movedim(0, dim)))


@dataclass(frozen=True)
class ContextParallelShard:
    """This rank's slice [start, end) of a packed row of `seq_len` tokens and what its mixers need to know."""

    rank: int
    size: int
    start: int
    end: int
    cu_seqlens: torch.Tensor  # int32: the document boundaries inside the slice, 0 and end - start included
    position_ids: torch.Tensor  # [1, end - start]: positions within each document (they continue across ranks)
    continues: tuple[bool, ...]  # [r]: rank r's first token belongs to the document of rank r - 1's last token
    halo_valid: torch.Tensor  # bool [W_max]: which of the positions before `start` are in this rank's first document
    # bool [1, 1, end - start, seq_len]: local queries x global keys, block-causal. Materialised: seq_len^2 / size
    # bytes, fine up to tens of thousands of tokens; longer contexts need a per-document or flex attention kernel.
    attention_mask: torch.Tensor


def _halo_rows(first_document_start: int, start: int, rows: int, device) -> torch.Tensor:
    """bool [rows]: whether global positions start - rows, ..., start - 1 lie in the document that starts at
    `first_document_start` (the one this rank's first token belongs to)."""
    return torch.arange(start - rows, start, device=device) >= first_document_start


class ContextParallel:
    """The context-parallel sequence ops of one process group, with the signatures of the single-process ones
    (`kernels.causal_conv1d`, `kernels.chunk_gated_delta_rule`, `F.scaled_dot_product_attention`), applied to the
    slice set by the last `shard` call."""

    # Conv windows up to this width get their halo from the previous rank (Qwen3.5's is 4).
    MAX_CONV_WIDTH = 8

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.current: ContextParallelShard | None = None

    def shard(self, cu_seqlens: torch.Tensor, seq_len: int) -> ContextParallelShard:
        """Split a packed row of `seq_len` tokens with document boundaries `cu_seqlens` ([N + 1], 0 and seq_len
        included) into this rank's consecutive slice; make it the slice the ops work on and return it. Slice
        inputs with `shard.start:shard.end` and call the model with `position_ids` and `cu_seqlens` of the shard."""
        if seq_len % self.size:
            raise ValueError(f"context parallelism: the sequence length {seq_len} must be divisible by the "
                             f"context-parallel degree {self.size} (each rank holds seq_len / degree tokens)")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != seq_len or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"context parallelism: cu_seqlens must rise strictly from 0 to the sequence length "
                             f"{seq_len}, got {bounds}")
        local = seq_len // self.size
        if local < self.MAX_CONV_WIDTH - 1:
            raise ValueError(f"context parallelism: each rank's {local} tokens must cover a conv window "
                             f"({self.MAX_CONV_WIDTH - 1} tokens); use a longer sequence or a smaller degree")
        start, end = self.rank * local, (self.rank + 1) * local
        device = cu_seqlens.device
        inside = [b - start for b in bounds if start < b < end]
        first_document_start = max(b for b in bounds if b <= start)
        positions = torch.arange(start, end, device=device)
        idx = torch.arange(seq_len, device=device)
        boundaries = torch.tensor(bounds, device=device)
        doc = torch.searchsorted(boundaries[1:], idx, right=True)
        document_positions = idx - boundaries[doc]
        self.current = ContextParallelShard(
            rank=self.rank, size=self.size, start=start, end=end,
            cu_seqlens=torch.tensor([0, *inside, local], dtype=torch.int32, device=device),
            position_ids=document_positions[start:end][None],
            continues=tuple(r > 0 and r * local not in bounds for r in range(self.size)),
            halo_valid=_halo_rows(first_document_start, start, self.MAX_CONV_WIDTH - 1, device),
            attention_mask=((doc[start:end, None] == doc[None, :]) & (idx[None, :] <= positions[:, None]))[None, None],
        )
        return self.current

    def _current_shard(self) -> ContextParallelShard:
        if self.current is None:
            raise RuntimeError("context parallelism: call ContextParallel.shard(cu_seqlens, seq_len) before the "
                               "model's forward")
        return self.current

    def _shard_for(self, cu_seqlens, initial_state, output_final_state) -> ContextParallelShard:
        shard = self._current_shard()
        if cu_seqlens is not shard.cu_seqlens:
            raise ValueError("context parallelism: the model must be called with cu_seqlens=shard.cu_seqlens of "
                             "the current ContextParallel.shard")
        if initial_state is not None or output_final_state:
            raise ValueError("context parallelism does not carry caller states (decoding caches)")
        return shard

    def causal_conv1d(self, x, weight, initial_state=None, output_final_state=False, cu_seqlens=None,
                      activation="silu"):
        shard = self._shard_for(cu_seqlens, initial_state, output_final_state)
        B, T, C = x.shape
        W = weight.shape[1]
        if W > self.MAX_CONV_WIDTH:
            raise ValueError(f"context parallelism supports conv widths up to {self.MAX_CONV_WIDTH}, got {W}")
        rank, rows = shard.rank, W - 1

        def previous_rank_halo(tails):  # [size, W - 1, C]: every rank's last W - 1 inputs
            if not shard.continues[rank]:
                return tails.new_zeros(B, rows, C)
            return tails[rank - 1:rank] * shard.halo_valid[-rows:, None].to(tails.dtype)

        halo = all_gather(x[:, T - rows:], self.group, select=previous_rank_halo)
        # The conv state is the last W inputs before t = 0 (its oldest row is never used) for the first sequence.
        first_state = F.pad(halo.transpose(1, 2), (1, 0))
        rest = first_state.new_zeros(cu_seqlens.numel() - 2, C, W)
        y, _ = kernels.causal_conv1d(x, weight, initial_state=torch.cat([first_state, rest]),
                                     cu_seqlens=cu_seqlens, activation=activation)
        return y, None

    def chunk_gated_delta_rule(self, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, backend=None):
        shard = self._shard_for(cu_seqlens, initial_state, output_final_state)
        B, T, HV, V = v.shape
        K = q.shape[-1]
        N = cu_seqlens.numel() - 1
        state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        identity = torch.eye(K, dtype=state_dtype, device=v.device).expand(1, HV, K, K)
        s0 = torch.cat([torch.cat([identity.new_zeros(1, HV, K, V), identity], -1),
                        identity.new_zeros(N - 1, HV, K, V + K)])
        o_aug, final = kernels.chunk_gated_delta_rule(
            q, k, torch.cat([v, v.new_zeros(B, T, HV, K)], -1), g, beta, scale=scale, initial_state=s0,
            output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, backend=backend)
        o_zero, through = o_aug.split([V, K], dim=-1)

        # Every rank's last-sequence [U | M]; each scans those of the ranks before it for its incoming state.
        def incoming_state(transitions):  # [size, HV, K, V + K]
            s_in = transitions.new_zeros(HV, K, V)
            for r in range(1, shard.rank + 1):
                outgoing, transition = transitions[r - 1].split([V, K], dim=-1)
                s_in = transition @ s_in + outgoing if shard.continues[r] else torch.zeros_like(s_in)
            return s_in

        s_in = all_gather(final[-1:], self.group, select=incoming_state)
        incoming = torch.einsum("bthk,hkv->bthv", through.to(state_dtype), s_in)
        return (o_zero.to(state_dtype) + incoming).to(v.dtype), None

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, is_causal=False, enable_gqa=False):
        """query [B, H, T_local, D], key/value [B, H_kv, T_local, D]; attn_mask/is_causal (the single-process
        mask) are replaced by the shard's block-causal mask over the gathered keys."""
        shard = self._current_shard()
        keys, values = all_gather(key, self.group, dim=2), all_gather(value, self.group, dim=2)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=shard.attention_mask,
                                              enable_gqa=enable_gqa)


def apply_context_parallel(model: Qwen35ForCausalLM, group: dist.ProcessGroup) -> ContextParallel:
    """Route every mixer's sequence ops through one `ContextParallel` of `group` and return it; the caller shards
    each batch with it before the forward. Parameters are untouched: their gradients are partial sums over the
    group's ranks, to be summed over the group (FSDP over a mesh that includes it, or an all-reduce)."""
    cp = ContextParallel(group)
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.sequence_kernels = cp
        elif isinstance(module, GatedAttention):
            module.attention_kernel = cp.scaled_dot_product_attention
    return cp
