"""torch.compile per decoder block (fullgraph: the blocks are written without graph breaks). Blocks repeat,
so a few graphs serve the whole model and compile time stays small.

With expert parallelism an MoE block is compiled around its experts instead: the experts' token exchange sizes
its all-to-alls from the routing (host-side split sizes) and the experts carry their own FSDP hooks, neither of
which a fullgraph capture can hold. So the norms, the token mixer, the router and the shared expert are compiled
one by one; the experts (two grouped GEMMs between the all-to-alls), the shared expert's one-GEMM gate and the
residual adds run eagerly, as torchtitan does for its MoE models."""

from __future__ import annotations

import torch
from torch import nn

from qwen35 import Qwen35ForCausalLM
from qwen35.moe import SparseMoE


def apply_compile(model: Qwen35ForCausalLM, backend: str = "inductor", expert_parallel: bool = False) -> None:
    # Activation checkpointing replays the forward in the backward; python side effects of the forward (the
    # tensor-parallel parameter swaps) must not be replayed inside the compiled backward.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in model.decoder_layers():
        block = getattr(layer, "_checkpoint_wrapped_module", layer)  # under activation checkpointing
        if expert_parallel and isinstance(block.mlp, SparseMoE):
            for module in _around_experts(block):
                module.compile(backend=backend, fullgraph=True)
        else:
            layer.compile(backend=backend, fullgraph=True)  # in place: parameter names do not change


def _around_experts(block: nn.Module) -> list[nn.Module]:
    """The block's modules other than the MoE, and the MoE's other than the experts. A bare torch.nn layer (the
    shared expert's gate, one GEMM) is left out: Dynamo does not start a frame in torch.nn's own code."""
    parts = [module for name, module in block.named_children() if name != "mlp"]
    parts += [module for name, module in block.mlp.named_children() if name != "experts"]
    return [module for module in parts if not type(module).__module__.startswith("torch.nn.")]
