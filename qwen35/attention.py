"""Gated full attention: doubled q_proj (per-head query | gate), QK-norm before partial RoPE, GQA, sigmoid gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen35Config
from .layers import RMSNorm, apply_rotary


class GatedAttention(nn.Module):
    # The attention core, F.scaled_dot_product_attention's signature (parallelism.context_parallel replaces it
    # per module with attention over the keys of every rank).
    attention_kernel = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache=None) -> torch.Tensor:
        """x [B, T, hidden]; attn_mask: None for plain causal attention, else bool [B or 1, 1, T, keys]
        (True = attend); kv_cache: a `KVCache` whose `update` returns all keys/values so far."""
        B, T, _ = x.shape
        # q_proj rows are laid out per head as [query (D) | gate (D)].
        query, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, self.num_heads * self.head_dim)
        query = apply_rotary(self.q_norm(query), cos, sin).transpose(1, 2)
        key = apply_rotary(self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)), cos, sin)
        key = key.transpose(1, 2)
        value = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            key, value = kv_cache.update(key, value)
        out = self.attention_kernel(query, key, value, attn_mask=attn_mask, is_causal=attn_mask is None,
                                    enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate))
