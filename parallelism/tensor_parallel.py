"""Tensor + sequence parallelism for Qwen35ForCausalLM.

Between blocks the residual stream is a DTensor sharded on the sequence dim (Shard(1)); the RMSNorms run on
it as torch's SequenceParallel. Each mixer and dense MLP gathers the sequence, runs *unmodified* on plain local
tensors holding its heads / intermediate columns (see local_execution), and reduce-scatters its partial output
back to sequence shards. The modules read head counts from attributes, which are set to per-rank values.

Parameter storage (all DTensors on the TP mesh, global shapes and layouts identical to HF's):
- q_proj / k_proj / v_proj, in_proj_z / in_proj_b / in_proj_a, dt_bias, A_log, gate_proj / up_proj: Shard(0),
  i.e. by head (q_proj rows are per head [query | gate], so a head's gate stays with its query).
- o_proj, out_proj, down_proj: Shard(1). q_norm, k_norm and the GDN gated-norm weight: Replicate (per head-dim,
  shared by all heads; their gradients are summed over TP ranks).
- in_proj_qkv and conv1d are fused [Q | K | V] with Q, K and V of different sizes when Hv * Dv != Hk * Dk.
  Shard(0) would give rank 0 all of Q and part of K; no DTensor placement describes "rows r/n of each block".
  They are stored Shard(0) for memory and checkpoints, and each forward all-gathers them and takes this rank's
  rows of each block (the backward reduce-scatters the gradient). This costs one weight all-gather per GDN
  layer, like an FSDP unshard, and keeps checkpoints in HF's layout for any TP degree.
- MoE blocks are not split by TP: every TP rank runs the whole block on the gathered sequence with replicated
  router / shared expert weights (experts are split by expert parallelism instead).
- The MTP head (qwen35.mtp; fc, one decoder layer, norms) is not split either: its input is shifted by one token,
  T - 1 rows that do not split evenly into sequence shards, so every TP rank runs the whole head on the gathered
  sequence with replicated weights, like an MoE block, and hands the loss its output as a Replicate DTensor
  (the loss's vocab-parallel cross entropy sums its partial gradient over the TP ranks). It costs one decoder
  layer's weights per TP rank and the head's compute repeated on each.
- embed_tokens: vocab-sharded (RowwiseParallel, output sequence-sharded); lm_head: ColwiseParallel. Its logits
  are all-gathered (Replicate, plain tensors: any loss function works unchanged) or, with `loss_parallel`, left
  vocab-sharded as a DTensor [B, T, V] Shard(2) for a vocab-parallel cross entropy (torchtitan's loss takes it):
  no rank then holds the full [B, T, 248320] logits or their gradient.

The embedding's reduce-scatter is completed before the blocks run (`_complete_async_local`): RowwiseParallel
issues it with `async_op=True`, which leaves the output DTensor holding an AsyncCollectiveTensor as its local
tensor. A compiled block must never receive such an input. torch 2.13's AOTAutograd cache keys a DTensor input
by its placements and shape only, not by the type of its local tensor, so a block compiled for the first layer's
(async) input and one compiled for the other layers' (plain) inputs share a cache entry; whichever is stored
first is replayed for the other. With a recompile whose backward is compiled at once (dynamic shapes, e.g.
when the packed batch's `cu_seqlens` changes length) the plain input is unwrapped as if it were async and the
step fails with `'Tensor' object has no attribute 'elem'`. Inductor also does not wait on an async tensor
nested in a DTensor (pytorch/pytorch#180614). With every block input a plain-local DTensor there is one input
structure, one compiled graph per block type instead of two, and nothing to wait for inside compiled code.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from qwen35 import Qwen35ForCausalLM
from qwen35.attention import GatedAttention
from qwen35.gated_deltanet import GatedDeltaNet
from qwen35.layers import SwiGLU
from qwen35.moe import SparseMoE

from .local_execution import (LocalView, distribute_parameters, local_replica, local_replica_summed_grad, local_rows_of_blocks,
                              local_shard, run_on_local_tensors)


def apply_tensor_parallel(model: Qwen35ForCausalLM, tp_mesh: DeviceMesh, *, experts_on_ep: bool = False,
                          loss_parallel: bool = False) -> None:
    """Split `model` over `tp_mesh` in place. experts_on_ep: MoE expert tensors are left for expert
    parallelism instead of being replicated over TP. loss_parallel: the logits stay vocab-sharded DTensors."""
    lm_head = (ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(2), use_local_output=False)
               if loss_parallel else ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                  use_local_output=False),
            "model.norm": SequenceParallel(),
            "lm_head": lm_head}
    # a pipeline stage holds some of them only (parallelism.pipeline)
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items() if _holds(model, name)})
    embedding = model.model.embed_tokens
    if embedding is not None:
        embedding.register_forward_hook(lambda module, args, output: _complete_async_local(output))
    if model.config.tie_word_embeddings and embedding is not None and model.lm_head is not None:
        # both are vocab-sharded Shard(0): share the one DTensor again
        model.lm_head.weight = embedding.weight
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {"input_layernorm": SequenceParallel(),
                                            "post_attention_layernorm": SequenceParallel()})
        if isinstance(getattr(layer, "linear_attn", None), GatedDeltaNet):
            _shard_gated_deltanet(layer.linear_attn, tp_mesh)
        else:
            _shard_gated_attention(layer.self_attn, tp_mesh)
        if isinstance(layer.mlp, SwiGLU):
            _shard_swiglu(layer.mlp, tp_mesh)
        elif isinstance(layer.mlp, SparseMoE):
            _replicate_moe(layer.mlp, tp_mesh, skip_experts=experts_on_ep)
    if model.mtp is not None:
        _replicate_mtp(model.mtp, tp_mesh)


def _holds(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent), leaf) is not None


def _shard_gated_deltanet(gdn: GatedDeltaNet, mesh: DeviceMesh) -> None:
    tp, rank = mesh.size(), mesh.get_local_rank()
    qkv_rows = local_rows_of_blocks([gdn.key_dim, gdn.key_dim, gdn.value_dim], rank, tp)
    by_head, by_input_column = (Shard(0), local_shard), (Shard(1), local_shard)
    _run_head_sharded(gdn, mesh, {
        "in_proj_qkv.weight": (Shard(0), qkv_rows),
        "conv1d.weight": (Shard(0), qkv_rows),
        "in_proj_z.weight": by_head,
        "in_proj_b.weight": by_head,
        "in_proj_a.weight": by_head,
        "dt_bias": by_head,
        "A_log": by_head,
        "norm.weight": (Replicate(), local_replica_summed_grad),
        "out_proj.weight": by_input_column,
    })
    gdn.num_k_heads //= tp
    gdn.num_v_heads //= tp
    gdn.key_dim //= tp
    gdn.value_dim //= tp


def _shard_gated_attention(attn: GatedAttention, mesh: DeviceMesh) -> None:
    by_head = (Shard(0), local_shard)
    _run_head_sharded(attn, mesh, {
        "q_proj.weight": by_head,
        "k_proj.weight": by_head,
        "v_proj.weight": by_head,
        "o_proj.weight": (Shard(1), local_shard),
        "q_norm.weight": (Replicate(), local_replica_summed_grad),
        "k_norm.weight": (Replicate(), local_replica_summed_grad),
    })
    attn.num_heads //= mesh.size()
    attn.num_kv_heads //= mesh.size()


def _shard_swiglu(mlp: SwiGLU, mesh: DeviceMesh) -> None:
    _run_head_sharded(mlp, mesh, {
        "gate_proj.weight": (Shard(0), local_shard),
        "up_proj.weight": (Shard(0), local_shard),
        "down_proj.weight": (Shard(1), local_shard),
    })


def _replicate_moe(moe: SparseMoE, mesh: DeviceMesh, *, skip_experts: bool) -> None:
    names = [name for name, _ in moe.named_parameters() if not (skip_experts and name.startswith("experts."))]
    distribute_parameters(moe, mesh, {name: Replicate() for name in names})
    # Every TP rank computes the same output and the same complete gradients from the gathered sequence.
    run_on_local_tensors(
        moe, {name: local_replica for name in names},
        map_args=lambda args: (args[0].redistribute(placements=[Replicate()]).to_local(), *args[1:]),
        map_output=lambda out: (_scatter_sequence(out[0], mesh), *out[1:]))  # (hidden, router logits)


def _replicate_mtp(mtp: nn.Module, mesh: DeviceMesh) -> None:
    names = [name for name, _ in mtp.named_parameters()]
    distribute_parameters(mtp, mesh, {name: Replicate() for name in names})
    # args: (hidden [B, T-1, H], next_embeds [B, T-1, H], cos, sin); each rank's gradients of them are complete
    run_on_local_tensors(
        mtp, {name: local_replica for name in names},
        map_args=lambda args: (*(_replicated_local(x) for x in args[:2]), *args[2:]),
        map_output=lambda out: (DTensor.from_local(out[0], mesh, [Replicate()], run_check=False), *out[1:]))


def _replicated_local(x: torch.Tensor) -> torch.Tensor:
    return x.redistribute(placements=[Replicate()]).to_local() if isinstance(x, DTensor) else x


def _run_head_sharded(module: nn.Module, mesh: DeviceMesh,
                      layout: dict[str, tuple[Placement, LocalView]]) -> None:
    """Store each parameter with its placement and run `module` on local heads: gather the sequence in,
    reduce-scatter the partial sums out."""
    distribute_parameters(module, mesh, {name: placement for name, (placement, _) in layout.items()})
    run_on_local_tensors(module, {name: view for name, (_, view) in layout.items()},
                         map_args=lambda args: (_gather_sequence(args[0]), *args[1:]),
                         map_output=lambda partial_sum: _reduce_scatter_sequence(partial_sum, mesh))


class _CompleteAsyncLocal(torch.autograd.Function):
    """Identity on a DTensor whose local tensor is an AsyncCollectiveTensor: the same DTensor (mesh, placements,
    global shape) over the waited, plain local tensor. The gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x: DTensor) -> DTensor:
        return DTensor.from_local(x.to_local().wait(), x.device_mesh, x.placements, run_check=False,
                                  shape=x.shape, stride=x.stride())

    @staticmethod
    def backward(ctx, grad: DTensor) -> DTensor:
        return grad


def _complete_async_local(x: DTensor) -> DTensor:
    """Wait for the pending collective behind `x` (see the module docstring: compiled blocks get plain locals)."""
    if isinstance(x.to_local(), AsyncCollectiveTensor):
        return _CompleteAsyncLocal.apply(x)
    return x


def _gather_sequence(x: DTensor) -> torch.Tensor:
    # Each rank's input gradient covers only its heads: sum over ranks (reduce-scatter) in the backward.
    return x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])


def _reduce_scatter_sequence(partial_sum: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    return DTensor.from_local(partial_sum, mesh, [Partial()], run_check=False).redistribute(placements=[Shard(1)])


def _scatter_sequence(replicated: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    return DTensor.from_local(replicated, mesh, [Replicate()], run_check=False).redistribute(placements=[Shard(1)])

