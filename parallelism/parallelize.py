"""Apply every parallelism and training transform to a Qwen35ForCausalLM, in torchtitan's order: context
parallelism -> TP/SP -> EP -> float8 -> activation checkpointing -> torch.compile -> FSDP2 (or, for mixed precision
without FSDP, autocast)."""

from __future__ import annotations

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


def parallelize(model: Qwen35ForCausalLM, dims: ParallelDims, meshes: ParallelMeshes | None, *, ac: str = "none",
                compile: bool = False, compile_backend: str = "inductor", float8: bool = False,
                float8_emulate: bool = False, mp_policy: MixedPrecisionPolicy | None = None,
                loss_parallel: bool = False) -> Qwen35ForCausalLM:
    """Transform `model` in place (and return it). `meshes` comes from `dims.build_meshes(device_type)`
    (None for a single process). loss_parallel (TP only): the model returns vocab-sharded DTensor logits for a
    vocab-parallel loss instead of gathering them. mp_policy: FSDP's mixed precision; without FSDP its 16-bit
    param_dtype is applied by autocast (`parallelism.autocast`). With dims.cp > 1 the model gets a
    `context_parallel` attribute (`parallelism.context_parallel.ContextParallel`) that must shard every batch.
    Raises ValueError naming the offending setting before touching the model."""
    dims.validate_for(model.config)
    if ac not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode must be one of {AC_MODES}, got {ac!r}")
    if dims.cp > 1 and compile:
        raise ValueError(f"parallelism.cp={dims.cp} does not compose with compile yet")

    if dims.cp > 1:
        model.context_parallel = apply_context_parallel(model, meshes.cp.get_group())

    if dims.tp > 1:
        apply_tensor_parallel(model, meshes.tp, experts_on_ep=dims.ep > 1, loss_parallel=loss_parallel)
    if dims.ep > 1:
        apply_expert_parallel(model, meshes.ep)
    if float8:
        apply_float8(model, emulate=float8_emulate)
    apply_activation_checkpointing(model, ac)
    if compile:
        apply_compile(model, compile_backend, expert_parallel=dims.ep > 1)
    if dims.fsdp_enabled:
        apply_fsdp(model, meshes.fsdp, expert_dp_mesh=meshes.expert_fsdp if dims.ep > 1 else None,
                   expert_grad_divide_factor=dims.dp, mp_policy=mp_policy)
    elif (dtype := autocast_dtype(model, dims, mp_policy)) is not None:
        apply_autocast(model, dtype)
    return model
