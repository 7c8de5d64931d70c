"""Training FLOPs per token of the Qwen3.5 hybrid decoder (forward + backward), feeding torchtitan's tflops and
MFU metrics.

    flops/token = 6 * N_active                                        (matmul parameters)
                + 6 * n_full_attention_layers * n_heads * (d_qk + d_v) * seq_len   (attention scores)
                + 3 * n_gdn_layers * n_value_heads * gdn_forward_per_token_per_head  (chunkwise delta rule)

Conventions (torchtitan's, `torchtitan.models.utils.get_{dense,moe}_model_nparams_and_flops`, extended):
- N_active: every parameter except the input embedding (a lookup, not a matmul); with tied embeddings the one
  shared matrix is counted, since it is the lm_head matmul. MoE routed experts count with top_k / num_experts
  (router, shared expert and its gate in full). Small non-matmul parameters (norm weights, the depthwise conv,
  A_log, dt_bias) are inside N as in torchtitan; they are < 0.5% of N for every published size.
- Attention: both score matmuls over the full seq_len x seq_len square (causal and document sparsity ignored),
  backward = 2x forward, recomputation not counted. Only the full-attention layers have this term.
- Gated DeltaNet: the chunkwise (WY/UT) algorithm with C = 64 on full C x C tiles, as fla and our kernels
  compute it (shared/reference/delta-rule-kernels.md section 6): forward per token per value head
  10*C*d + 6*d^2 for d_k = d_v = d (general form (6 d_k + 4 d_v) C + 6 d_k d_v). Backward = 2x forward like
  every other term: the reference measures fla's backward autograd matmuls at 366,592 per token per head for
  d = 128, 1.7% above 2x forward (360,448); fla's recomputation of w, u, h is excluded as recomputation is
  everywhere else in MFU. The triangular solve (~2C^3/3 per chunk) is not counted, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qwen35 import Qwen35Config
from qwen35.config import FULL_ATTENTION, LINEAR_ATTENTION

GDN_CHUNK_SIZE = 64
_FWD_PLUS_BWD = 3  # backward = 2 x forward


def gdn_forward_flops_per_token_per_head(d_k: int, d_v: int, chunk_size: int = GDN_CHUNK_SIZE) -> int:
    """K K^T (2C^2 d_k), W = T(K..) (2C^2 d_k), U = T(V..) (2C^2 d_v), v_new = U - W S (2C d_k d_v),
    S update (2C d_k d_v), O = Q S (2C d_k d_v) + (Q K^T) (2C^2 d_k) v_new (2C^2 d_v); per chunk / C."""
    return (6 * d_k + 4 * d_v) * chunk_size + 6 * d_k * d_v


@dataclass(frozen=True)
class FlopsPerToken:
    matmul: int  # 6 * N_active
    attention: int  # full-attention score matmuls
    gated_deltanet: int  # chunkwise delta rule

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.gated_deltanet


def active_matmul_params(model: nn.Module, config: Qwen35Config) -> int:
    """Parameters a token's forward multiplies with (see module docstring). `model` may be on meta."""
    total = embedding = experts = 0
    embedding_weight = model.get_submodule("model.embed_tokens").weight
    for name, param in model.named_parameters():  # deduplicated: a tied lm_head appears once
        total += param.numel()
        if param is embedding_weight and not config.tie_word_embeddings:
            embedding += param.numel()
        elif ".mlp.experts." in name:
            experts += param.numel()
    active_experts = experts * config.num_experts_per_tok // config.num_experts if config.is_moe else 0
    return total - embedding - experts + active_experts


def flops_per_token(model: nn.Module, config: Qwen35Config, seq_len: int) -> FlopsPerToken:
    n_attention = config.layer_types.count(FULL_ATTENTION)
    n_gdn = config.layer_types.count(LINEAR_ATTENTION)
    attention = _FWD_PLUS_BWD * n_attention * config.num_attention_heads * 2 * (2 * config.head_dim) * seq_len
    gdn = _FWD_PLUS_BWD * n_gdn * config.linear_num_value_heads * gdn_forward_flops_per_token_per_head(
        config.linear_key_head_dim, config.linear_value_head_dim)
    return FlopsPerToken(matmul=6 * active_matmul_params(model, config), attention=attention, gated_deltanet=gdn)
