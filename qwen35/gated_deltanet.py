"""Gated DeltaNet mixer: causal depthwise conv over q,k,v + SiLU, gated delta rule, gated RMSNorm, out_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.gated_delta_rule import reference as delta_rule_reference

from .config import Qwen35Config
from .layers import GatedRMSNorm


def traces_recurrent_step(device: torch.device | str) -> bool:
    """Whether a compiled decode step on `device` traces the one-token delta-rule update (its torch reference) into
    its graph, where inductor fuses its few small ops (CPU), instead of calling the registered in-place op (CUDA: the
    Triton kernel, which updates the state in one pass)."""
    return torch.device(device).type == "cpu"


def recurrent_step(query, key, value, g, beta, state: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode position of the gated delta rule (q/k L2-normalised), advancing `state` in place: the registered
    in-place op, or, compiled where `traces_recurrent_step`, its CPU implementation traced into the graph."""
    if torch.compiler.is_compiling() and traces_recurrent_step(state.device):
        out, final_state = delta_rule_reference.recurrent_gated_delta_rule(
            query, key, value, g, beta, scale=scale, initial_state=state, output_final_state=True,
            use_qk_l2norm=True)
        state.copy_(final_state)
        return out
    return torch.ops.qwen35.recurrent_gated_delta_rule_(query, key, value, g, beta, state, scale, None, True, None)


class GatedDeltaNet(nn.Module):
    # The sequence ops (causal_conv1d, chunk_gated_delta_rule): the kernels package, or an object with the same
    # signatures that spreads the sequence over ranks (parallelism.context_parallel sets it per module).
    sequence_kernels = kernels

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        hidden = config.hidden_size
        conv_dim = config.conv_dim
        self.in_proj_qkv = nn.Linear(hidden, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)
        # Kept as an nn.Conv1d for HF's parameter name and shape [C, 1, K]; applied through kernels.causal_conv1d.
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.dt_bias)
        # log(U(0.01, 16)): the lower bound keeps A_log finite.
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log_())

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x [B, T, hidden]; cu_seqlens int32 [N+1] for a packed batch (B == 1); padding_mask [B, T] (1 = token)
        zeroes padded inputs so the conv window and the state stay clean; cache: a `GatedDeltaNetCache`."""
        if padding_mask is not None:
            x = x * padding_mask[..., None].to(x.dtype)
        B, T, _ = x.shape
        # Token-by-token on the cache: one-token steps, and the recorded steps of speculative verification.
        decode_step = cache is not None and cache.initialized and (T == 1 or cache.step_conv_states is not None)
        conv_weight = self.conv1d.weight.squeeze(1)
        mixed = self.in_proj_qkv(x)
        if decode_step:
            columns = []
            for t in range(T):
                if t:
                    cache.step_conv_states[t - 1].copy_(cache.conv_state)
                columns.append(kernels.causal_conv1d_update(mixed[:, t], cache.conv_state, conv_weight))
            mixed = torch.stack(columns, 1)
        else:
            mixed, conv_state = self.sequence_kernels.causal_conv1d(
                mixed, conv_weight, initial_state=cache.conv_state if cache is not None and cache.initialized else None,
                output_final_state=cache is not None, cu_seqlens=cu_seqlens)
            if cache is not None:
                cache.conv_state.copy_(conv_state)
        query, key, value = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.view(B, T, self.num_k_heads, self.head_k_dim)
        key = key.view(B, T, self.num_k_heads, self.head_k_dim)
        value = value.view(B, T, self.num_v_heads, self.head_v_dim)

        beta = self.in_proj_b(x).sigmoid()
        # Log-decay in fp32 even for low-precision models (exp(A_log) overflows fp16).
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)

        if decode_step:
            # The in-place op advances the cached state without allocating a new one or copying it back.
            outs = []
            for t in range(T):
                if t:
                    cache.step_recurrent_states[t - 1].copy_(cache.recurrent_state)
                outs.append(recurrent_step(query[:, t:t + 1], key[:, t:t + 1], value[:, t:t + 1], g[:, t:t + 1],
                                           beta[:, t:t + 1], cache.recurrent_state, self.head_k_dim ** -0.5))
            out = outs[0] if T == 1 else torch.cat(outs, 1)
        else:
            out, state = self.sequence_kernels.chunk_gated_delta_rule(
                query, key, value, g, beta, initial_state=cache.recurrent_state if cache is not None and
                cache.initialized else None, output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                use_qk_l2norm=True)
            if cache is not None:
                cache.recurrent_state.copy_(state)
                cache.initialized = True

        z = self.in_proj_z(x).view(B, T, self.num_v_heads, self.head_v_dim)
        out = self.norm(out, z).reshape(B, T, self.value_dim)
        return self.out_proj(out)
