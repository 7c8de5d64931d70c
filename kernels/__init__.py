"""Kernels for Qwen3.5's Gated DeltaNet layers: the gated delta rule and the causal depthwise conv.

Each op has a torch reference (the CPU implementation and the test oracle); the delta rule also gets a Triton
backend for CUDA. Importing this package needs only torch (transformers probes a top-level package named
`kernels`, so this one must stay cheap to import and must not look like the HF `kernels` hub package).
"""

from .causal_conv import causal_conv1d, causal_conv1d_update
from .gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv1d", "causal_conv1d_update"]
