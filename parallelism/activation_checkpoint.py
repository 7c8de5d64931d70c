"""Activation checkpointing per decoder block: "full" recomputes the whole block in the backward, "selective"
keeps the outputs of the expensive ops (matmuls, attention, delta-rule kernels, collectives) and recomputes
the cheap element-wise ones and norms."""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from qwen35 import Qwen35ForCausalLM

AC_MODES = ("none", "full", "selective")

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._grouped_mm.default,
    _aten._scaled_mm.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.qwen35.per_document_attention.default,  # packed rows on CPU
    torch.ops.higher_order.flex_attention,  # packed rows on CUDA
    torch.ops.qwen35.chunk_gated_delta_rule_fwd.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_to_all_single.default,
}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Qwen35ForCausalLM, mode: str) -> None:
    """mode: one of AC_MODES (checked by ParallelizeSettings)."""
    if mode == "none":
        return
    # early_stop=False: the recompute runs each block's forward to the end, so the forward hooks that swap
    # tensor/expert-parallel parameters for local views (local_execution) always put them back.
    kwargs = dict(preserve_rng_state=False, early_stop=False)
    if mode == "selective":
        # FSDP2's hooks on separately sharded modules (the experts under EP) open profiler ranges a different
        # number of times in the forward and in its recompute, and selective checkpointing counts every op: the
        # recompute then asks for a `_record_function_enter_new` the forward never cached and fails ("invocation
        # index 2 encountered during backward but not found in storage"). Profiler ranges produce nothing to
        # cache; have SAC run them as they come, as it already does for detach.
        torch.utils.checkpoint.SAC_IGNORED_OPS.update({torch.ops.profiler._record_function_enter_new.default,
                                                      torch.ops.profiler._record_function_exit._RecordFunction})
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    # the decoder's blocks and the MTP head's layer; by name: a pipeline stage's layers keep their whole-model
    # indices (parallelism.pipeline.StageLayers)
    for layers in (model.model.layers, *([model.mtp.layers] if model.mtp is not None else [])):
        for name, layer in list(layers.named_children()):
            layers.register_module(name, checkpoint_wrapper(layer, **kwargs))
