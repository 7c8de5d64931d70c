"""Pipeline parallelism for Qwen35ForCausalLM: the decoder split by layers into stages (the embedding on the first,
the final norm, lm_head and MTP head on the last), what a stage's forward passes on, and the embedding copies.

A stage is a copy of the model (built on the meta device, so copying is free) with the modules of other stages
removed: parameter names stay the whole model's (`model.layers.5.mlp...`), so checkpoints load across pipeline
degrees. Each microbatch's `cu_seqlens` (and position_ids, if given) reach every stage as keyword arguments, so each
stage derives the same positions and document masks; only activations travel between stages.

What a stage passes to the next: the hidden states [B, T, hidden] and, for an MoE model with a load-balancing
loss, the router statistics of the layers so far: the probability sums [E] (float32, differentiable, so the
gradient of the loss flows back to every stage's routers) and the assignment counts with the row count appended
[E + 1] (int64, no gradient). The last stage adds its own (and its MTP layer's) and hands the total to the loss,
which then sees what one process would (`qwen35.moe.RouterStatistics`).

The MTP head (trained with a non-zero mtp_loss_weight) lives on the last stage, which then also needs the embedding
(of the tokens t+1) and the microbatch's input ids: the last stage holds a copy of the embedding (`EmbeddingCopies`;
for a tied model that copy is its lm_head) and the ids reach it as the keyword `mtp_input_ids`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from qwen35 import Qwen35ForCausalLM
from qwen35.moe import RouterStatistics, router_statistics

EMBEDDING, LAYERS, FINAL_NORM, LM_HEAD = "model.embed_tokens", "model.layers", "model.norm", "lm_head"


@dataclass(frozen=True)
class StagePlan:
    index: int
    num_stages: int
    layers: tuple[int, ...]  # whole-model indices of the decoder layers this stage runs

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def plan_stages(module_names_per_stage: list[list[str]], num_layers: int, key: str) -> list[StagePlan]:
    """Stage plans from the module names of each stage (`key`: where they came from, for errors). Names are the
    model's (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`) or torchtitan's (`tok_embeddings`,
    `layers.N`, `norm`, `lm_head`). The embedding must be on the first stage, the final norm and lm_head on the
    last, and every layer on exactly one stage, in order."""
    aliases = {"tok_embeddings": EMBEDDING, "norm": FINAL_NORM}
    num_stages = len(module_names_per_stage)
    plans, next_layer = [], 0
    for index, names in enumerate(module_names_per_stage):
        layers = []
        for name in names:
            name = aliases.get(name, name)
            if name.startswith("layers."):
                name = f"model.{name}"
            if name.startswith(f"{LAYERS}.") and name[len(LAYERS) + 1:].isdigit():
                layer = int(name[len(LAYERS) + 1:])
                if layer != next_layer:
                    raise ValueError(f"{key}: stage {index} holds {name}, expected {LAYERS}.{next_layer}: every "
                                     f"decoder layer 0..{num_layers - 1} on exactly one stage, in order")
                layers.append(layer)
                next_layer += 1
            elif (name, index) not in ((EMBEDDING, 0), (FINAL_NORM, num_stages - 1), (LM_HEAD, num_stages - 1)):
                raise ValueError(f"{key}: stage {index} of {num_stages} holds {name!r}; the stages hold "
                                 f"{LAYERS}.N, {EMBEDDING} (first stage only), {FINAL_NORM} and {LM_HEAD} (last "
                                 "stage only)")
        plans.append(StagePlan(index, num_stages, tuple(layers)))
    if next_layer != num_layers:
        raise ValueError(f"{key}: the stages hold layers 0..{next_layer - 1}, the model has {num_layers}")
    named = {aliases.get(n, n) for names in module_names_per_stage for n in names}
    missing = [name for name in (EMBEDDING, FINAL_NORM, LM_HEAD) if name not in named]
    if missing:
        raise ValueError(f"{key}: no stage holds {', '.join(missing)}")
    return plans


class StageLayers(nn.ModuleList):
    """The decoder layers of one stage under their whole-model indices: iteration gives them in order and
    `layers[i]` is whole-model layer i, so parameter names are the whole model's."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __setitem__(self, index: int, module: nn.Module) -> None:
        self.add_module(str(index), module)


def needs_embedding_on_last_stage(model: Qwen35ForCausalLM) -> bool:
    """The last stage runs the MTP head for its loss, which embeds the tokens t+1."""
    return model.mtp is not None and bool(model.config.mtp_loss_weight)


def split_model(model: Qwen35ForCausalLM, plan: StagePlan) -> Qwen35ForCausalLM:
    """A copy of `model` holding `plan`'s modules only (the others are None); `pipeline_stage` is the plan.
    A tied lm_head on the last stage, and the embedding the last stage holds for the MTP loss, are that stage's
    own copies of the first stage's embedding (`EmbeddingCopies`)."""
    stage = copy.deepcopy(model)
    decoder = stage.model
    decoder.layers = StageLayers({i: decoder.layers[i] for i in plan.layers})
    if not plan.is_first and not (plan.is_last and needs_embedding_on_last_stage(model)):
        decoder.embed_tokens = None  # (a tied model's last stage keeps it tied to its lm_head: one copy)
    if not plan.is_last:
        decoder.norm = None
        stage.lm_head = None
        stage.mtp = None
    stage.pipeline_stage = plan
    return stage


def run_stage(model: Qwen35ForCausalLM, inputs: torch.Tensor, carried: tuple[torch.Tensor, ...], *,
              position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              with_router_stats: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One stage's forward: input ids (first stage) or the previous stage's hidden states [B, T, hidden] ->
    (hidden states, normed on the last stage; the router statistics so far as (prob_sum, counts), or () without).
    `carried`: the previous stage's statistics (empty on the first stage)."""
    decoder = model.model
    x = decoder.embed_tokens(inputs) if model.pipeline_stage.is_first else inputs
    B, T = x.shape[:2]
    attn_mask = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got a microbatch of {B} rows")
        packed_positions, attn_mask = model._packed_attention_mask(cu_seqlens, T)
        position_ids = packed_positions if position_ids is None else position_ids
    elif position_ids is None:
        position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
    cos, sin = decoder.rotary_emb(position_ids, x.dtype)
    router_logits = []
    for layer in decoder.layers:
        x, logits = layer(x, cos, sin, attn_mask=attn_mask, cu_seqlens=cu_seqlens)
        if logits is not None:
            router_logits.append(logits)
    if decoder.norm is not None:
        x = decoder.norm(x)
    if not with_router_stats:
        return x, ()
    return x, add_router_statistics(model, carried, router_logits, x.device)


def add_router_statistics(model: Qwen35ForCausalLM, carried: tuple[torch.Tensor, ...],
                          router_logits: list[torch.Tensor], device: torch.device,
                          row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics so far (`carried`, empty: none yet) with those of `router_logits` added (of the rows
    `row_mask` marks, qwen35.moe.router_statistics)."""
    experts = model.config.num_experts
    prob_sum, counts = carried or (torch.zeros(experts, dtype=torch.float32, device=device),
                                   torch.zeros(experts + 1, dtype=torch.int64, device=device))
    if router_logits:
        stats = router_statistics(router_logits, experts, model.config.num_experts_per_tok, row_mask)
        prob_sum = prob_sum + stats.prob_sum
        counts = counts + torch.cat([stats.assignments, stats.assignments.new_zeros(1) + stats.rows])
    return prob_sum, counts


def carried_router_statistics(carried: tuple[torch.Tensor, ...]) -> RouterStatistics:
    """The statistics `run_stage` passes on, as the loss takes them (rows a 0-dim int64 tensor)."""
    prob_sum, counts = carried
    return RouterStatistics(assignments=counts[:-1], prob_sum=prob_sum, rows=counts[-1])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _local_grad(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the gradient, laid out as the parameter (the two copies' shards then correspond: a
    tensor-parallel embedding's gradient comes replicated while its weight is vocab-sharded)."""
    if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)
    return _local(param.grad)


class EmbeddingCopies:
    """The embedding weight on the first and the last pipeline stage: the first stage holds the embedding, the
    last stage a tied lm_head or, for the MTP loss, an embedding (tied to its lm_head if the model is tied), each
    its own copy, kept one set of weights semantically.

    After the backward, the last stage's gradient is added to the first stage's and dropped (`sum_gradients`),
    so the first copy carries the weight's whole gradient, is counted once in the gradient norm (as in one
    process) and is the one the optimizer steps; after the step its values are copied to the last stage
    (`copy_weights`), as also at initialisation. The ranks pair up by position within their stage (the same
    FSDP / TP shard), so the copies are plain tensor sends of local shards over the pipeline group, or local
    copies when one rank holds both stages (V-shaped schedules)."""

    def __init__(self, first: Qwen35ForCausalLM | None, last: Qwen35ForCausalLM | None, first_rank: int,
                 last_rank: int, group: dist.ProcessGroup | None):
        self.first, self.last = first, last  # this rank's first / last stage models, if it holds them
        self.first_rank, self.last_rank, self.group = first_rank, last_rank, group

    def _weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        last = None
        if self.last is not None:
            embedding = self.last.model.embed_tokens
            last = (embedding if embedding is not None else self.last.lm_head).weight
        return self.first.model.embed_tokens.weight if self.first is not None else None, last

    @torch.no_grad()
    def sum_gradients(self) -> None:
        first, last = self._weights()
        if last is not None:
            if last.grad is None:
                raise RuntimeError("the last pipeline stage's copy of the embedding has no gradient to add to the "
                                   "first stage's")
            if first is not None:
                _local_grad(first).add_(_local_grad(last))
            else:
                dist.send(_local_grad(last).contiguous(), dst=self.first_rank, group=self.group)
            last.grad = None
        elif first is not None:
            received = torch.empty_like(_local_grad(first))
            dist.recv(received, src=self.last_rank, group=self.group)
            _local_grad(first).add_(received)

    @torch.no_grad()
    def copy_weights(self) -> None:
        first, last = self._weights()
        if first is not None and last is not None:
            _local(last).copy_(_local(first))
        elif first is not None:
            dist.send(_local(first).contiguous(), dst=self.last_rank, group=self.group)
        elif last is not None:
            received = torch.empty_like(_local(last))
            dist.recv(received, src=self.first_rank, group=self.group)
            _local(last).copy_(received)
