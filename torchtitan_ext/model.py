"""The plain qwen35 model as a torchtitan model: a `BaseModel` that *is* a `Qwen35ForCausalLM`.

Inheriting (rather than wrapping) keeps the state-dict keys equal to HF's text-model keys and lets code written
against qwen35 module types (parallelism/) see the model it expects.

Training output: in training mode the model returns `TrainingOutput(hidden_states, lm_head_weight, router_stats,
aux_loss_coef)` instead of the logits, and `torchtitan_ext.loss.Qwen35Loss` applies the lm_head inside a
memory-bounded linear + cross entropy (`qwen35.linear_cross_entropy`): the [tokens, vocab] logits are never
materialised. The weight is read during the forward, when FSDP holds it unsharded (the final norm + lm_head unit
is kept gathered after the forward; a tied weight lives in the root unit, which is too). An extra loss term on the
final hidden states adds a field here and a term in `Qwen35Loss`, as multi-token prediction does
(`mtp_hidden_states`, through the same chunked loss).

MoE auxiliary loss: `router_stats` are the sums over this forward's (layer, token) rows that the load-balancing
loss (transformers' definition) is made of (`qwen35.moe.RouterStatistics`: per-expert top-k assignment counts,
per-expert router-probability sums, row count), computed by qwen35 from the router logits the decoder blocks return,
i.e. outside the compiled and checkpointed blocks. They are not reduced to a loss here because under data
parallelism the loss is a statistic of the global batch: torchtitan hands the model output straight to the loss,
and `Qwen35Loss` sums the counts over the ranks and adds the term. Every model in eval mode (validation) returns
plain logits.

Pipeline parallelism: a stage (`pipeline_stage` set by parallelism.pipeline.split_model) runs its part of the
decoder (`pipeline_stage_forward`); torch's pipelining passes tensors only, so the last stage returns the
TrainingOutput's tensors and `PipelineLoss` rebuilds it for the loss. The MTP head runs on the last stage, with the
input ids passed to every stage as the keyword `mtp_input_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate

from parallelism.pipeline import StagePlan, add_router_statistics, carried_router_statistics, run_stage

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.moe import RouterStatistics, router_statistics
from qwen35.mtp import mtp_hidden_states, mtp_rows_within_documents
from torchtitan.protocols import BaseModel

from .flops import flops_per_token


class TrainingOutput(NamedTuple):
    hidden_states: torch.Tensor  # [B, T, hidden] after the final norm (DTensor Shard(1) under tensor parallelism)
    lm_head_weight: torch.Tensor  # [vocab, hidden] (DTensor Shard(0), i.e. vocab-sharded, under tensor parallelism)
    router_stats: RouterStatistics | None  # MoE with a non-zero router_aux_loss_coef: of this forward's tokens,
    #                                        not reduced over ranks
    aux_loss_coef: float  # router_aux_loss_coef: weight of the load-balancing loss
    mtp_hidden_states: torch.Tensor | None = None  # [B, T-1, hidden]: row t predicts token t+2 (qwen35.mtp)
    mtp_loss_weight: float = 0.0
    cu_seqlens: torch.Tensor | None = None  # the packed documents, so that no MTP target crosses a boundary
    stats_group: ProcessGroup | None = None  # the ranks whose router statistics add up to the global batch's
    #                                          (None: the world; under pipeline parallelism the last stage's ranks)


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

    # Set on the copies parallelism.pipeline.split_model makes: this model is one pipeline stage.
    pipeline_stage: StagePlan | None = None

    def __init__(self, config: Config):
        Qwen35ForCausalLM.__init__(self, config.architecture)

    @property
    def with_router_stats(self) -> bool:
        return bool(self.config.is_moe and self.config.router_aux_loss_coef)

    def forward(self, input_ids: torch.Tensor, *carried: torch.Tensor, **kwargs):
        """Qwen35ForCausalLM.forward; in training mode (unless the caller asks for aux outputs itself)
        `TrainingOutput`: the final hidden states for the loss's lm_head, the MoE router statistics (non-zero
        router_aux_loss_coef) and, with a non-zero mtp_loss_weight, the MTP head's hidden states; an MoE MTP
        layer's router rows join the statistics like those of one more MoE layer (those within a document). A
        pipeline stage: `pipeline_stage_forward`."""
        if self.pipeline_stage is not None:
            return self.pipeline_stage_forward(input_ids, *carried, **kwargs)
        config = self.config
        if not self.training or "return_aux_loss" in kwargs or "return_router_stats" in kwargs:
            return Qwen35ForCausalLM.forward(self, input_ids, **kwargs)
        with_stats = self.with_router_stats
        out = Qwen35ForCausalLM.forward(self, input_ids, output="hidden", return_router_stats=with_stats,
                                        **kwargs)
        hidden, stats = out if with_stats else (out, None)
        cu_seqlens, mtp_hidden = kwargs.get("cu_seqlens"), None
        if config.mtp_loss_weight:
            mtp_hidden, mtp_router_logits = self._mtp_hidden_states(hidden, input_ids, cu_seqlens)
            if with_stats:
                stats = stats.merged(router_statistics(mtp_router_logits, config.num_experts,
                                                       config.num_experts_per_tok,
                                                       _mtp_router_rows(input_ids, cu_seqlens)))
        return self._training_output(hidden, stats, mtp_hidden, cu_seqlens)

    def _mtp_hidden_states(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                           cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # Under tensor parallelism the head runs on the gathered sequence (parallelism.tensor_parallel): gather
        # before its one-token shift.
        mtp_input = hidden.redistribute(placements=[Replicate()]) if isinstance(hidden, DTensor) else hidden
        return mtp_hidden_states(self, mtp_input, input_ids, cu_seqlens)

    def pipeline_stage_forward(self, inputs: torch.Tensor, *carried: torch.Tensor,
                               mtp_input_ids: torch.Tensor | None = None, **kwargs):
        """inputs: input ids (first stage) or the previous stage's hidden states, `carried` its router statistics
        (parallelism.pipeline.run_stage). A stage before the last returns (hidden, *statistics), or the hidden
        states alone. The last returns, in eval mode, the logits; in training mode the tensors of the
        TrainingOutput, (final hidden states, lm_head weight, [MTP hidden states, cu_seqlens,] *statistics)
        (torch's pipelining takes tensors only; the MTP pair with a non-zero mtp_loss_weight, its router rows
        added to the statistics), which `PipelineLoss` hands to the loss as a TrainingOutput. mtp_input_ids: the
        microbatch's input ids, which the last stage's MTP head needs (every stage receives them)."""
        hidden, carried = run_stage(self, inputs, carried, with_router_stats=self.with_router_stats, **kwargs)
        if not self.pipeline_stage.is_last:
            return (hidden, *carried) if carried else hidden
        if not self.training:
            return self.lm_head(hidden)
        mtp_hidden, mtp_outputs, cu_seqlens = None, (), kwargs.get("cu_seqlens")
        if self.config.mtp_loss_weight:
            if mtp_input_ids is None:
                raise ValueError("the last pipeline stage's MTP head needs the microbatch's input ids as the keyword "
                                 "mtp_input_ids (torchtitan_ext.trainer passes them)")
            mtp_hidden, mtp_router_logits = self._mtp_hidden_states(hidden, mtp_input_ids, cu_seqlens)
            if carried:
                carried = add_router_statistics(self, carried, mtp_router_logits, hidden.device,
                                                _mtp_router_rows(mtp_input_ids, cu_seqlens))
            # the documents of the row, for the MTP targets (one document without cu_seqlens)
            documents = cu_seqlens if cu_seqlens is not None else torch.tensor(
                [0, mtp_input_ids.shape[1]], dtype=torch.int32, device=mtp_input_ids.device)
        out = self._training_output(hidden, None, mtp_hidden, None)
        if mtp_hidden is not None:
            mtp_outputs = (out.mtp_hidden_states, documents)
        # A view of the weight: after each backward, torch's last stage detaches its outputs in place (to free
        # the graph), which must not detach the parameter itself.
        return (out.hidden_states, out.lm_head_weight.view_as(out.lm_head_weight), *mtp_outputs, *carried)

    def _training_output(self, hidden: torch.Tensor, stats: RouterStatistics | None,
                         mtp_hidden: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> TrainingOutput:
        config = self.config
        weight = self.lm_head.weight
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            # The loss applies the lm_head after this autocast region ends (parallelism.autocast): hand it the
            # inputs in the compute dtype, as the lm_head would have run here.
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            mtp_hidden = mtp_hidden.to(dtype) if mtp_hidden is not None else None
        return TrainingOutput(hidden, weight, stats, config.router_aux_loss_coef if stats is not None else 0.0,
                              mtp_hidden, config.mtp_loss_weight, cu_seqlens)

    def verify_module_protocol(self) -> None:
        """No-op: the internals are plain nn.Modules by design (HF names and layout); torchtitan's own HF
        backend (experiments/transformers_modeling_backend) skips the check for the same reason. Their
        initialisation is `Qwen35ForCausalLM.init_weights`, not torchtitan's per-module `param_init`."""

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        # to_empty() from meta gives embed_tokens and lm_head separate storage: restore the tie first (where a
        # pipeline stage holds one of them only, parallelism.pipeline.EmbeddingCopies keeps the copies equal).
        if self.model.embed_tokens is not None and self.lm_head is not None:
            self.tie_weights()
        if buffer_device is not None:
            self.model.rotary_emb.to(buffer_device)
        Qwen35ForCausalLM.init_weights(self)


def _mtp_router_rows(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """The MTP router rows that count in the load-balancing statistics: those within a document, so that the
    statistics do not depend on the packing (one process's row of 4 windows has a boundary row where 2 ranks' rows
    of 2 windows have none)."""
    if cu_seqlens is None:
        return None
    return mtp_rows_within_documents(input_ids.shape[1], cu_seqlens).expand(input_ids.shape[0], -1).reshape(-1)


class PipelineLoss:
    """The loss of the last pipeline stage: its training outputs (Qwen35TitanModel.pipeline_stage_forward) as the
    TrainingOutput the loss takes, with the router statistics reduced over `stats_group` (the last stage's ranks);
    eval-mode logits pass through."""

    def __init__(self, loss_fn, config: Qwen35Config, stats_group: ProcessGroup | None):
        self.loss_fn, self.config, self.stats_group = loss_fn, config, stats_group

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, **kwargs):
        if isinstance(outputs, torch.Tensor):
            return self.loss_fn(outputs, labels, **kwargs)
        hidden, weight, *carried = outputs
        mtp_hidden = documents = None
        if self.config.mtp_loss_weight:
            mtp_hidden, documents, *carried = carried
        stats = carried_router_statistics(tuple(carried)) if carried else None
        coef = self.config.router_aux_loss_coef if stats is not None else 0.0
        return self.loss_fn(TrainingOutput(hidden, weight, stats, coef, mtp_hidden, self.config.mtp_loss_weight,
                                           documents, stats_group=self.stats_group), labels, **kwargs)
