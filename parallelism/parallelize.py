"""Apply every parallelism and training transform to a Qwen35ForCausalLM, in torchtitan's order: context
parallelism -> TP/SP -> EP -> float8 -> activation checkpointing -> torch.compile -> FSDP2 (or, for mixed precision
without FSDP, autocast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from qwen35 import Qwen35ForCausalLM

from .activation_checkpoint import AC_MODES, apply_activation_checkpointing
from .autocast import apply_autocast, autocast_dtype
from .compile import apply_compile
from .context_parallel import apply_context_parallel
from .expert_parallel import apply_expert_parallel
from .float8 import apply_float8
from .fsdp import apply_fsdp
from .parallel_dims import ParallelDims, ParallelMeshes
from .tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True)
class ParallelizeSettings:
    """The transforms `parallelize` applies besides splitting the model over the ParallelDims."""

    activation_checkpoint: Literal[AC_MODES] = "none"
    compile: bool = False  # torch.compile per block
    compile_backend: str = "inductor"
    float8: bool = False  # torchao float8 (tensorwise) for the large nn.Linear layers
    float8_emulate: bool = False  # float8 numerics without float8 hardware (CPU, pre-SM89 GPUs)
    # FSDP's mixed precision; without FSDP its 16-bit param_dtype is applied by autocast (parallelism.autocast)
    mp_policy: MixedPrecisionPolicy | None = None
    loss_parallel: bool = False  # TP: the model returns vocab-sharded DTensor logits for a vocab-parallel loss
    fsdp_reshard_after_forward: bool = True  # False: keep parameters gathered from forward to backward
    fsdp_cpu_offload: bool = False  # FSDP keeps parameters, gradients and optimizer state in host memory

    def __post_init__(self):
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(f"activation_checkpoint.mode must be one of {AC_MODES}, "
                             f"got {self.activation_checkpoint!r}")


@dataclass(frozen=True)
class ParallelizeRecord:
    """What `parallelize` applied: the degrees, the settings and what it decided from them."""

    dims: ParallelDims
    settings: ParallelizeSettings
    autocast: torch.dtype | None  # the forward's autocast dtype (mixed precision without FSDP)

    def __str__(self) -> str:
        dims, settings = self.dims, self.settings
        applied = [f"{name}={degree}" for name, degree in (("pp", dims.pp), ("dp_replicate", dims.dp_replicate),
                                                           ("dp_shard", dims.dp_shard), ("cp", dims.cp),
                                                           ("tp", dims.tp),
                                                           ("ep", dims.ep)) if degree > 1]
        if settings.activation_checkpoint != "none":
            applied.append(f"ac={settings.activation_checkpoint}")
        if settings.compile:
            applied.append(f"compile(backend={settings.compile_backend})")
        if settings.float8:
            applied.append(f"float8({'emulated' if settings.float8_emulate else 'hardware'})")
        if settings.loss_parallel and dims.tp > 1:
            applied.append("loss_parallel")
        if dims.fsdp_enabled:
            applied.append(f"fsdp(reshard_after_forward={settings.fsdp_reshard_after_forward}, "
                           f"cpu_offload={settings.fsdp_cpu_offload})")
        if self.autocast is not None:
            applied.append(f"autocast({str(self.autocast).removeprefix('torch.')})")
        return ", ".join(applied) or "no parallelism or transforms"


def parallelize(model: Qwen35ForCausalLM, dims: ParallelDims, meshes: ParallelMeshes | None,
                settings: ParallelizeSettings = ParallelizeSettings()) -> ParallelizeRecord:
    """Transform `model` in place and return what was applied. `meshes` comes from
    `dims.build_meshes(device_type)` (None for a single process).
    Raises ValueError naming the offending setting before touching the model."""
    dims.validate_for(model.config)
    autocast = None if dims.fsdp_enabled else autocast_dtype(model, settings.mp_policy)

    if dims.cp > 1:  # the model's `context_parallel` (parallelism.context_parallel) must shard every batch
        model.context_parallel = apply_context_parallel(model, meshes.cp.get_group())

    if dims.tp > 1:
        apply_tensor_parallel(model, meshes.tp, experts_on_ep=dims.ep > 1, loss_parallel=settings.loss_parallel)
    if dims.ep > 1:
        apply_expert_parallel(model, meshes.ep)
    if settings.float8:
        apply_float8(model, emulate=settings.float8_emulate)
    apply_activation_checkpointing(model, settings.activation_checkpoint)
    if settings.compile:
        apply_compile(model, settings.compile_backend, expert_parallel=dims.ep > 1)
    if dims.fsdp_enabled:
        apply_fsdp(model, meshes.fsdp, expert_dp_mesh=meshes.expert_fsdp if dims.ep > 1 else None,
                   expert_grad_divide_factor=dims.dp, mp_policy=settings.mp_policy,
                   reshard_after_forward=settings.fsdp_reshard_after_forward, cpu_offload=settings.fsdp_cpu_offload)
    elif autocast is not None:
        apply_autocast(model, autocast)
    return ParallelizeRecord(dims, settings, autocast)
