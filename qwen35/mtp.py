"""The multi-token-prediction (MTP) head that every published Qwen3.5 checkpoint ships under `mtp.*`.

At position t it combines the main model's final (normed) hidden state h_t with the embedding of token t+1 and
predicts token t+2:

    x = fc([pre_fc_norm_embedding(embed(token_{t+1})) || pre_fc_norm_hidden(h_t)])     # fc: 2H -> H, no bias
    x = decoder_layer(x)       # one full-attention layer with the model's MLP (dense SwiGLU or MoE), RoPE at t
    logits_{t+2} = lm_head(norm(x))                                   # embedding and lm_head shared with the model

(the order inside the concatenation, embedding first, is vLLM's `qwen3_5_mtp.py` / `qwen3_next_mtp.py`). The
module names are the checkpoint's, so `mtp.fc.weight`, `mtp.layers.0.self_attn.q_proj.weight`, ... load by name.

Training (`mtp_loss_terms`): the head runs on positions 0..T-2 of a training row; the target of position t is
labels[t+1] (= token t+2), masked where the main loss masks it and wherever position t+1 lies in another packed
document than position t. The function takes (hidden states, input ids, labels, cu_seqlens, model), so it composes
with a loss that receives logits or one that receives the final hidden states.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import FULL_ATTENTION, Qwen35Config
from .layers import RMSNorm

IGNORE_INDEX = -100


def mtp_layer_config(config: Qwen35Config) -> Qwen35Config:
    """The MTP decoder layer's config: one full-attention layer, everything else as the main model."""
    return dataclasses.replace(config, num_hidden_layers=1, layer_types=[FULL_ATTENTION], mtp_num_hidden_layers=0,
                               mtp_loss_weight=0.0)


class MultiTokenPredictor(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        from .model import DecoderLayer  # model.py builds this head, so the import cannot be at module level

        hidden = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        layer_config = mtp_layer_config(config)
        self.layers = nn.ModuleList(DecoderLayer(layer_config, 0) for _ in range(config.mtp_num_hidden_layers))
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """hidden: the main model's final normed hidden states [B, T, H] at positions t; next_embeds: embeddings of
        the tokens at t+1 [B, T, H]; cos/sin of positions t; attn_mask as the decoder layers take it (None =
        causal); cache: a `Qwen35Cache` of `mtp_layer_config(config)`, advanced by T. Returns (normed hidden
        states for the shared lm_head [B, T, H], router logits of MoE layers)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        if cache is not None and attn_mask is None:
            attn_mask = cache.attention_mask(None, x.shape[1])
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, cos, sin, attn_mask=attn_mask, cache=cache.layers[0] if cache is not None else None)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x), router_logits


def training_positions_and_mask(seq_len: int, cu_seqlens: torch.Tensor | None, device):
    """Positions [1, seq_len] and attention mask (None = causal, else block-causal [1, 1, seq_len, seq_len]) of the
    MTP head's rows 0..seq_len-1 of a training row whose documents are cu_seqlens (or one document)."""
    if cu_seqlens is None:
        return torch.arange(seq_len, device=device)[None], None
    from .model import packed_positions_and_mask

    return packed_positions_and_mask(cu_seqlens.clamp(max=seq_len), seq_len)


def mtp_hidden_states(model, hidden: torch.Tensor, input_ids: torch.Tensor,
                      cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The MTP head over a training row: hidden [B, T, H] (the model's final normed hidden states of input_ids
    [B, T]) -> (MTP hidden states [B, T-1, H] whose lm_head logits at t predict token t+2, MoE router logits)."""
    if model.mtp is None:
        raise ValueError("the model has no MTP head (config.mtp_num_hidden_layers = 0)")
    T = input_ids.shape[1]
    positions, attn_mask = training_positions_and_mask(T - 1, cu_seqlens, input_ids.device)
    positions = positions.expand(input_ids.shape[0], T - 1)
    cos, sin = model.model.rotary_emb(positions, hidden.dtype)
    next_embeds = model.model.embed_tokens(input_ids[:, 1:])
    return model.mtp(hidden[:, :-1], next_embeds, cos, sin, attn_mask=attn_mask)


def mtp_rows_within_documents(seq_len: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[seq_len - 1] bool: whether MTP row t of a packed training row (position t and token t+1) lies in one
    document. The others join the last position of a document with the next document's first token: they have no
    target, and whether they exist depends on how the documents were packed into rows (and rows dealt to ranks)."""
    index = torch.arange(seq_len, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:-1].to(index.dtype), index, right=True)
    return doc[:-1] == doc[1:]


def mtp_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets [B, T-1] of the MTP rows 0..T-2: labels[:, t+1] (token t+2), set to ignore_index where position t+1
    belongs to another packed document than position t. A label belongs to its position's document (the data
    pipelines ignore a label that would cross into the next document), so no target crosses a boundary."""
    targets = labels[:, 1:]
    if cu_seqlens is None:
        return targets
    same_document = mtp_rows_within_documents(labels.shape[1], cu_seqlens.to(labels.device))
    return torch.where(same_document[None], targets, torch.full_like(targets, ignore_index))


def mtp_loss_terms(hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                   cu_seqlens: torch.Tensor | None, model, ignore_index: int = IGNORE_INDEX,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-next-token cross entropy of the MTP head over this row's valid targets, their count).
    Divide by the same token count as the main loss (e.g. the global valid tokens) and weight by
    `config.mtp_loss_weight`."""
    mtp_hidden, _ = mtp_hidden_states(model, hidden, input_ids, cu_seqlens)
    targets = mtp_targets(labels, cu_seqlens, ignore_index)
    logits = model.lm_head(mtp_hidden)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                               reduction="sum")
    return loss_sum, (targets != ignore_index).sum()
