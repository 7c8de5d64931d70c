"""The plain qwen35 model as a torchtitan model: a `BaseModel` that *is* a `Qwen35ForCausalLM`.

Inheriting (rather than wrapping) keeps the state-dict keys equal to HF's text-model keys and lets code written
against qwen35 module types (parallelism/) see the model it expects.

MoE auxiliary loss: in training mode an MoE model returns `MoETrainingOutput(logits, router_stats, aux_loss_coef)`
instead of the logits. `router_stats` are the sums over this forward's (layer, token) rows that the load-balancing
loss (transformers' definition) is made of (`qwen35.moe.RouterStatistics`: per-expert top-k assignment counts,
per-expert router-probability sums, row count), computed by qwen35 from the router logits the decoder blocks return,
i.e. outside the compiled and checkpointed blocks. They are not reduced to a loss here because under data
parallelism the loss is a statistic of the global batch: torchtitan hands the model output straight to the loss,
and `torchtitan_ext.loss.Qwen35Loss` sums the counts over the ranks and adds the term. Dense models, and every model
in eval mode (validation), return plain logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.moe import RouterStatistics
from qwen35.mtp import mtp_hidden_states
from torchtitan.protocols import BaseModel

from .flops import flops_per_token


class MoETrainingOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, vocab]
    router_stats: RouterStatistics  # of this forward's tokens, not reduced over ranks
    aux_loss_coef: float  # router_aux_loss_coef: weight of the load-balancing loss


class MTPTrainingOutput(NamedTuple):
    main: torch.Tensor | MoETrainingOutput  # what the model returns without the MTP loss
    mtp_logits: torch.Tensor  # [B, T-1, vocab]: row t predicts token t+2 (qwen35.mtp.mtp_hidden_states)
    cu_seqlens: torch.Tensor | None  # the packed documents, so that no MTP target crosses a boundary
    weight: float  # mtp_loss_weight


class Qwen35TitanModel(BaseModel, Qwen35ForCausalLM):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        flavor: str
        architecture: Qwen35Config

        def update_from_config(self, *, config, **kwargs) -> None:
            seq_len = config.training.seq_len
            if seq_len > self.architecture.max_position_embeddings:
                raise ValueError(f"training.seq_len = {seq_len} exceeds the {self.flavor} model's "
                                 f"max_position_embeddings = {self.architecture.max_position_embeddings}")

        def get_nparams_and_flops(self, model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
            nparams = sum(p.numel() for p in model.parameters())
            return nparams, flops_per_token(model, self.architecture, seq_len).total

    def __init__(self, config: Config):
        Qwen35ForCausalLM.__init__(self, config.architecture)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        """Qwen35ForCausalLM.forward; in training mode, for an MoE config with a non-zero router_aux_loss_coef,
        `MoETrainingOutput(logits, router statistics, router_aux_loss_coef)`, and with a non-zero mtp_loss_weight
        that output wrapped in `MTPTrainingOutput` with the MTP head's logits (the MTP layer's router statistics
        are not part of the load-balancing loss)."""
        config = self.config
        explicit = "return_aux_loss" in kwargs or "return_router_stats" in kwargs
        router_stats = bool(self.training and config.is_moe and config.router_aux_loss_coef and not explicit)
        mtp = bool(self.training and config.mtp_loss_weight and not explicit)
        if not (router_stats or mtp):
            return Qwen35ForCausalLM.forward(self, input_ids, **kwargs)
        logits, *rest = Qwen35ForCausalLM.forward(self, input_ids, return_router_stats=router_stats,
                                                  return_hidden=mtp, **kwargs)
        main = MoETrainingOutput(logits, rest[-1], config.router_aux_loss_coef) if router_stats else logits
        if not mtp:
            return main
        cu_seqlens = kwargs.get("cu_seqlens")
        mtp_hidden, _ = mtp_hidden_states(self, rest[0], input_ids, cu_seqlens)
        return MTPTrainingOutput(main, self.lm_head(mtp_hidden), cu_seqlens, config.mtp_loss_weight)

    def verify_module_protocol(self) -> None:
        """No-op: the internals are plain nn.Modules by design (HF names and layout); torchtitan's own HF
        backend (experiments/transformers_modeling_backend) skips the check for the same reason. Their
        initialisation is `Qwen35ForCausalLM.init_weights`, not torchtitan's per-module `param_init`."""

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        # to_empty() from meta gives embed_tokens and lm_head separate storage: restore the tie first.
        self.tie_weights()
        if buffer_device is not None:
            self.model.rotary_emb.to(buffer_device)
        Qwen35ForCausalLM.init_weights(self)
