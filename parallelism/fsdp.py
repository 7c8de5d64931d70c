"""FSDP2 (`fully_shard`) per decoder block, HSDP when the data-parallel mesh is 2-D (replicate x shard)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from qwen35 import Qwen35ForCausalLM
from qwen35.moe import GroupedExperts


def apply_fsdp(model: Qwen35ForCausalLM, dp_mesh: DeviceMesh, *, expert_dp_mesh: DeviceMesh | None = None,
               expert_grad_divide_factor: int | None = None, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
    """Shard every block, the embedding and the final norm + lm_head as separate units, the rest at the root.

    reshard_after_forward: free each unit's gathered parameters after its forward (gather again in the backward);
    False keeps them from forward to backward (more memory, fewer all-gathers). cpu_offload: parameters, gradients
    and optimizer state live in host memory (pinned where there is an accelerator), copied to the device per unit.

    expert_dp_mesh: with expert parallelism, expert weights are already split over the EP ranks, which are
    data-parallel ranks; they are FSDP-sharded over the remaining ones and their gradient (a sum over every EP
    rank's tokens) is divided by expert_grad_divide_factor (the full data-parallel degree) to give the same
    mean as the other parameters.
    """
    policies = dict(mp_policy=mp_policy or MixedPrecisionPolicy(),
                    offload_policy=CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if cpu_offload
                    else OffloadPolicy())
    shard = dict(mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **policies)
    if expert_dp_mesh is not None:
        for experts in (m for layer in model.decoder_layers() for m in layer.modules()
                        if isinstance(m, GroupedExperts)):
            fully_shard(experts, mesh=expert_dp_mesh, reshard_after_forward=reshard_after_forward, **policies)
            experts.set_gradient_divide_factor(expert_grad_divide_factor)
    for layer in model.model.layers:
        fully_shard(layer, **shard)
    if model.mtp is not None:  # a unit as large as a block; it calls the embedding and lm_head units again
        fully_shard(model.mtp, **shard)
    # None where a pipeline stage does not hold them (parallelism.pipeline)
    embedding, norm, lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
    tied = embedding is not None and lm_head is not None and model.config.tie_word_embeddings
    if not tied:  # a tied weight must live in a single unit: the root
        if embedding is not None:
            fully_shard(embedding, **shard)
        if lm_head is not None:
            # Needed right after the last block's forward, and first in the backward: keep them gathered.
            fully_shard([norm, lm_head], **{**shard, "reshard_after_forward": False})
    # The root keeps its parameters gathered after the forward (FSDP2's own default for the root): a tied
    # embedding is the lm_head weight the chunked loss reads after the forward.
    fully_shard(model, **{**shard, "reshard_after_forward": False})
    if dp_mesh.device_type == "cpu":
        _use_plain_sum_reductions(model)


def _use_plain_sum_reductions(model: nn.Module) -> None:
    """gloo (the CPU backend) supports neither ReduceOp.AVG nor PREMUL_SUM, which FSDP2 uses to average
    gradients; reduce with SUM and divide afterwards instead (same result)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
