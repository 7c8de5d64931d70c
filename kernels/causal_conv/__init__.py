"""Causal depthwise conv1d over channels-last activations (the GDN short conv), with decode step.

    y, final_state = causal_conv1d(x, weight, initial_state=None, output_final_state=False,
                                   cu_seqlens=None, activation="silu")
    y = causal_conv1d_update(x, conv_state, weight, activation="silu")

x [B, T, C] (as a Linear outputs it); weight [C, W] (nn.Conv1d's [C, 1, W] squeezed), no bias;
y[t] = sum_j weight[:, j] * x[t - (W - 1) + j]; activation "silu" or None. Conv states are [N, C, W]: the
last W pre-conv inputs, zero left-padded. initial_state supplies the inputs before t = 0. With cu_seqlens
([N + 1], B == 1) no window crosses a sequence boundary and states are per sequence. The update is one
decode step: x [B, C], conv_state [B, C, W] updated in place. Math in weight's dtype, output in x's.
"""

from .._checks import num_sequences
from . import reference

ACTIVATIONS = ("silu", None)


def _check_weight_activation(weight, C, activation):
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be [C={C}, W] (the conv1d weight [C, 1, W] squeezed), got {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d(x, weight, initial_state=None, output_final_state=False, cu_seqlens=None, activation="silu"):
    """Causal depthwise conv over T. Returns (y [B, T, C] in x's dtype, final state [N, C, W] or None)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    B, T, C = x.shape
    _check_weight_activation(weight, C, activation)
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    N = num_sequences(B, cu_seqlens)
    W = weight.shape[1]
    if initial_state is not None and initial_state.shape != (N, C, W):
        raise ValueError(f"initial_state must be [N, C, W] = {(N, C, W)}, got {tuple(initial_state.shape)}")
    return reference.causal_conv1d(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                   cu_seqlens=cu_seqlens, activation=activation)


def causal_conv1d_update(x, conv_state, weight, activation="silu"):
    """One decode step: x [B, C]; conv_state [B, C, W] is shifted and appended to in place. Returns y [B, C]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, C] (one token per sequence), got {tuple(x.shape)}")
    B, C = x.shape
    _check_weight_activation(weight, C, activation)
    if conv_state.shape != (B, C, weight.shape[1]):
        raise ValueError(f"conv_state must be [B, C, W] = {(B, C, weight.shape[1])}, got {tuple(conv_state.shape)}")
    return reference.causal_conv1d_update(x, conv_state, weight, activation=activation)


__all__ = ["causal_conv1d", "causal_conv1d_update"]
