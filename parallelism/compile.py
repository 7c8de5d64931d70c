"""torch.compile per decoder block (fullgraph: the blocks are written without graph breaks). Blocks repeat,
so a few graphs serve the whole model and compile time stays small."""

from __future__ import annotations

import torch

from qwen35 import Qwen35ForCausalLM


def apply_compile(model: Qwen35ForCausalLM, backend: str = "inductor") -> None:
    # Activation checkpointing replays the forward in the backward; python side effects of the forward (the
    # tensor-parallel parameter swaps) must not be replayed inside the compiled backward.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in model.model.layers:
        layer.compile(backend=backend, fullgraph=True)  # in place: parameter names do not change
