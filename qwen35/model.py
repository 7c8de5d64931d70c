"""The Qwen3.5 hybrid decoder. Module names mirror transformers' `Qwen3_5ForCausalLM`, so the state dict keys are
exactly HF's text-only keys (`model.layers.N.linear_attn.in_proj_qkv.weight`, ...)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import GatedAttention, PackedDocuments, document_block_mask
from .cache import Qwen35Cache, padded_causal_mask
from .config import LINEAR_ATTENTION, Qwen35Config
from .gated_deltanet import GatedDeltaNet
from .layers import GatedRMSNorm, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import GroupedExperts, SparseMoE, TopKRouter, load_balancing_loss, router_statistics
from .mtp import MultiTokenPredictor


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + mlp(norm(.)). The mixer is Gated DeltaNet
    (`linear_attn`) or gated attention (`self_attn`); the MLP is dense SwiGLU or sparse MoE."""

    def __init__(self, config: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.mlp = SparseMoE(config) if config.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (hidden, router logits or None)."""
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR_ATTENTION:
            h = self.linear_attn(h, cu_seqlens=cu_seqlens, padding_mask=padding_mask, cache=cache)
        else:
            h = self.self_attn(h, cos, sin, attn_mask=attn_mask, kv_cache=cache)
        x = x + h
        h = self.post_attention_layernorm(x)
        router_logits = None
        if isinstance(self.mlp, SparseMoE):
            h, router_logits = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + h, router_logits


def call_layer(layer: DecoderLayer, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    return layer(*args, **kwargs)


class Qwen35TextModel(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)


def packed_document_ids_and_positions(cu_seqlens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a packed row of documents: each position's document index [T] and the positions restarting at 0 in
    each document [1, T]. Computed on device without host syncs."""
    idx = torch.arange(seq_len, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(idx.dtype), idx, right=True)
    return doc, (idx - cu_seqlens.to(idx.dtype)[doc])[None]


def packed_positions_and_mask(cu_seqlens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [1, T] and the dense block-causal attention mask [1, 1, T, T] of a packed row: the reference for
    the per-document attention (`packed_attention = "dense"`), O(T^2) memory."""
    doc, positions = packed_document_ids_and_positions(cu_seqlens, seq_len)
    idx = torch.arange(seq_len, device=cu_seqlens.device)
    mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    return positions, mask[None, None]


PACKED_ATTENTION_KINDS = ("auto", "flex", "per_document", "dense")
OUTPUTS = ("logits", "hidden", "logits_and_hidden")  # what `Qwen35ForCausalLM.forward` returns


class Qwen35ForCausalLM(nn.Module):
    # How attention layers treat the documents of a packed row (cu_seqlens): "auto" picks by device (CUDA: "flex",
    # flex_attention with a document block mask; otherwise "per_document", the CPU flash kernel run on each
    # document, as flex_attention has no CPU backward); "dense": a [T, T] mask, the reference in tests.
    packed_attention: str = "auto"

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.model = Qwen35TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MultiTokenPredictor(config) if config.mtp_num_hidden_layers else None
        self.tie_weights()
        self.init_weights()

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder's layers, then the MTP head's (those a pipeline stage holds)."""
        return [*self.model.layers, *(self.mtp.layers if self.mtp is not None else ())]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation: linear, conv, embedding, router and expert weights N(0, initializer_range);
        (1+w) norms 0; gated norm 1; dt_bias 1; A_log log(U(0.01, 16)). Works after `to_empty` from meta."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (RMSNorm, GatedRMSNorm, RotaryEmbedding, GatedDeltaNet, TopKRouter,
                                     GroupedExperts)):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                cache: Qwen35Cache | None = None, num_logits_to_keep: int = 0, return_aux_loss: bool = False,
                return_router_stats: bool = False, output: str = "logits", run_layer: Callable | None = None):
        """input_ids [B, T] -> `output`:
        - "logits": logits [B, T, vocab] (the last `num_logits_to_keep` positions when > 0);
        - "hidden": the final normed hidden states [B, T, hidden] of every position, for a caller that applies
          `lm_head` itself (the chunked loss, `qwen35.linear_cross_entropy`);
        - "logits_and_hidden": (those logits, those hidden states), e.g. for the MTP head, which reads the hidden
          states.

        cu_seqlens (int32 [N+1], B == 1): documents packed in one row; positions restart per document and no
        state, conv window or attention crosses a boundary. padding_mask [B, T] (1 = token, 0 = left padding).
        cache: decode state, advanced by T. return_aux_loss: also return the MoE load-balancing loss (unscaled).
        return_router_stats: also return its summable statistics (`qwen35.moe.RouterStatistics`), from which a
        data-parallel trainer forms the loss of the global batch. The extra outputs follow the output's tensors,
        as one tuple. run_layer(layer, x, cos, sin, **kwargs): applies each decoder layer (default `call_layer`;
        decoding passes a compiled one).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output = {output!r}; expected one of {', '.join(OUTPUTS)}")
        B, T = input_ids.shape
        attn_mask = None
        if cu_seqlens is not None:
            if B != 1 or cache is not None or padding_mask is not None:
                raise ValueError("cu_seqlens needs batch size 1 and no cache or padding_mask")
            packed_positions, attn_mask = self._packed_attention_mask(cu_seqlens, T)
            position_ids = packed_positions if position_ids is None else position_ids
        elif cache is not None:
            attn_mask = cache.attention_mask(padding_mask, T)
        elif padding_mask is not None:
            attn_mask = padded_causal_mask(padding_mask.bool(), 0)
        if position_ids is None:
            if padding_mask is not None:
                past = cache.valid[:, :cache.length].sum(-1, keepdim=True) if cache is not None else 0
                position_ids = (padding_mask.long().cumsum(-1) - 1 + past).clamp(min=0)
            else:
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + T, device=input_ids.device)[None].expand(B, T)

        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        router_logits = []
        for i, layer in enumerate(self.model.layers):
            x, logits = (run_layer or call_layer)(layer, x, cos, sin, attn_mask=attn_mask, cu_seqlens=cu_seqlens,
                                                  padding_mask=padding_mask,
                                                  cache=cache.layers[i] if cache is not None else None)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(T)
        hidden = self.model.norm(x)
        out = ()
        if output != "hidden":
            out += (self.lm_head(hidden[:, -num_logits_to_keep:] if num_logits_to_keep else hidden),)
        if output != "logits":
            out += (hidden,)
        if not (return_aux_loss or return_router_stats):
            return out if len(out) > 1 else out[0]
        if return_aux_loss and return_router_stats:
            raise ValueError("return_aux_loss and return_router_stats are exclusive")
        if not router_logits:
            raise ValueError("return_aux_loss / return_router_stats need an MoE config")
        experts, top_k = self.config.num_experts, self.config.num_experts_per_tok
        extra = (router_statistics(router_logits, experts, top_k) if return_router_stats
                 else load_balancing_loss(router_logits, experts, top_k))
        return (*out, extra)

    def _packed_attention_mask(self, cu_seqlens: torch.Tensor, seq_len: int):
        """(positions [1, T], the attention layers' `attn_mask` for the packed row) per `packed_attention`."""
        kind = self.packed_attention
        if kind not in PACKED_ATTENTION_KINDS:
            raise ValueError(f"packed_attention = {kind!r}; expected one of {', '.join(PACKED_ATTENTION_KINDS)}")
        if kind == "dense":
            return packed_positions_and_mask(cu_seqlens, seq_len)
        doc, positions = packed_document_ids_and_positions(cu_seqlens, seq_len)
        if kind == "flex" or (kind == "auto" and cu_seqlens.device.type == "cuda"):
            return positions, document_block_mask(doc)
        return positions, PackedDocuments(cu_seqlens)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # a tied lm_head counts once
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())
