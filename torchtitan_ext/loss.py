"""The training loss: cross entropy (summed, divided by the global count of valid tokens, as torchtitan's) plus, for
MoE models, `router_aux_loss_coef` times the router load-balancing loss of the global batch, made from the
statistics the model returns in training mode (`model.TrainingOutput`).

The cross entropy is computed from the final hidden states and the lm_head weight over blocks of `chunk_size`
tokens (`qwen35.linear_cross_entropy`): peak memory O(chunk_size x vocab), never the [tokens, vocab] logits or
their gradient. Under tensor parallelism the weight is vocab-sharded (DTensor Shard(0)) and the hidden states
sequence-sharded (Shard(1)): each rank gathers the sequence and computes the loss over its vocabulary rows, with
the log-sum-exp and target logits all-reduced over the TP group (no rank holds all logits). `chunk_size = None`
computes the full logits and torchtitan's (vocab-parallel) cross entropy instead: the reference.

How torchtitan combines losses. The loss is called once per microbatch on every rank; the trainer backpropagates
each call, sums gradients over microbatches and (FSDP with gradient division disabled) over the data-parallel ranks,
and logs the sum over microbatches and data-parallel ranks of the returned values. So the cross entropy, summed and
divided by the global valid-token count G, adds up to the global mean.

The load-balancing loss L = E * sum_e f_e * P_e (f_e: fraction of top-k assignments to expert e, P_e: mean router
probability of e, both over all MoE layers' (layer, token) rows) is not a sum over tokens, so per-rank losses do
not add up to it. Each microbatch instead all-reduces its integer statistics over the process group (no gradient):
the per-expert assignment counts A_e, the row count N and the valid-token count n. Every rank then returns

    coef * E * sum_e (A_e / N) * (S_e / N) * (n / G)          (S_e: this rank's router-probability sums)

whose sum over the ranks holding different tokens is coef * L(microbatch of the global batch) * (n / G): the same
value and, since A and N carry no gradient, the same gradients as one process computing L on all their rows.
With gradient accumulation each microbatch's global loss is weighted by its share n / G of the step's global valid
tokens (one microbatch: weight 1, so the step adds exactly coef * L of the global batch; for one rank and one
microbatch this is transformers' `loss + router_aux_loss_coef * aux_loss`). Without G (a summed loss) the weight is
n, keeping the sum convention.

The group is the default (world) one, so the loss needs no mesh: ranks that replicate the same tokens (tensor
parallelism, whose ranks share the batch and run the whole MoE block on the gathered sequence, so their router
statistics are identical) multiply A, N and n by the same replica count r, which cancels: A / N is unchanged
(bit for bit) and (S / N) * n up to rounding, while G, which torchtitan sums over the data-parallel ranks only, has
no such factor. Each replica then returns the value of its data-parallel rank (it back-propagates into replicated
router weights, whose gradients are not summed over replicas), and torchtitan logs the sum over the data-parallel
ranks only. This needs every rank of the world to call the loss for every microbatch, which holds without pipeline
parallelism (rejected by the Qwen3.5 parallelize function). The counts travel as one int64 tensor of E + 2 values
(exact at any scale) on the logits' device: one small all-reduce per microbatch, no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import spmd_types as spmd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss

from qwen35.linear_cross_entropy import DEFAULT_CHUNK_SIZE, linear_cross_entropy
from qwen35.moe import RouterStatistics, balancing_loss_share

from qwen35.mtp import mtp_targets

from .model import TrainingOutput

# Loss terms logged beside torchtitan's total loss (`metrics.Qwen35MetricsProcessor`): summed over the loss
# calls (microbatches) since the last log, detached.
_pending_loss_metrics: dict[str, torch.Tensor] = {}


def record_loss_metric(name: str, value: torch.Tensor) -> None:
    _pending_loss_metrics[name] = _pending_loss_metrics[name] + value if name in _pending_loss_metrics else value


def pop_loss_metrics() -> dict[str, torch.Tensor]:
    metrics = dict(_pending_loss_metrics)
    _pending_loss_metrics.clear()
    return metrics


def global_balancing_share(stats: RouterStatistics, valid_tokens: torch.Tensor,
                           group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the load-balancing loss of the rows of all ranks, valid tokens of all ranks).

    The assignment counts, row counts and `valid_tokens` are summed over `group` (default: the world; nothing is
    communicated in a single process) by one all-reduce that carries no gradient; the share is differentiable
    through this rank's probability sums. Over ranks holding different rows the shares add up to
    `qwen35.moe.load_balancing_loss` of all the rows, and so do their gradients."""
    counts = torch.cat([stats.assignments, stats.assignments.new_zeros(1) + stats.rows,
                        valid_tokens.detach().reshape(1).to(stats.assignments.dtype)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    assignments, rows, global_valid = counts[:-2], counts[-2], counts[-1]
    return balancing_loss_share(stats.prob_sum, assignments, rows), global_valid


class Qwen35Loss(CrossEntropyLoss):
    @dataclass(kw_only=True, slots=True)
    class Config(CrossEntropyLoss.Config):
        chunk_size: int | None = DEFAULT_CHUNK_SIZE
        """Tokens per block of the linear + cross entropy; None: full logits, then torchtitan's cross entropy."""

    def __init__(self, config: Config, **kwargs: Any):
        super().__init__(config, **kwargs)
        if config.chunk_size is not None and config.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be a positive number of tokens or None, got {config.chunk_size}")
        self.chunk_size = config.chunk_size

    def __call__(self, pred: torch.Tensor | TrainingOutput, labels: torch.Tensor,
                 global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(pred, TrainingOutput):  # logits (eval mode)
            return super().__call__(pred, labels, global_valid_tokens, **kwargs)
        loss, metrics = self._cross_entropy(pred.hidden_states, pred.lm_head_weight, labels, global_valid_tokens,
                                            **kwargs)
        if pred.mtp_hidden_states is not None:
            # Normalised like the main loss (summed, divided by the global count of valid tokens), so it adds up
            # over microbatches and data-parallel ranks the same way.
            targets = mtp_targets(labels, pred.cu_seqlens, IGNORE_INDEX)
            mtp, _ = self._cross_entropy(pred.mtp_hidden_states, pred.lm_head_weight, targets, global_valid_tokens,
                                         **kwargs)
            record_loss_metric("mtp_loss", mtp.detach())
            loss, metrics = loss + pred.mtp_loss_weight * mtp, {**metrics, "mtp_loss": mtp.detach()}
        if pred.router_stats is None:
            return loss, metrics
        with spmd.no_typecheck():
            share, weight = global_balancing_share(pred.router_stats, (labels != IGNORE_INDEX).sum())
            if global_valid_tokens is not None:
                weight = weight / global_valid_tokens
            loss = loss + pred.aux_loss_coef * share * weight
        return loss, metrics

    def _cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       global_valid_tokens: torch.Tensor | None,
                       **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross entropy of lm_head(hidden) against labels, summed over valid tokens / global_valid_tokens."""
        if self.chunk_size is None:
            logits = F.linear(_gathered_sequence(hidden), weight)
            return super().__call__(logits, labels, global_valid_tokens, **kwargs)
        loss = _chunked_cross_entropy(hidden, weight, labels, self.chunk_size)
        if global_valid_tokens is not None:
            with spmd.no_typecheck():
                loss = loss / global_valid_tokens
        return loss, {}


def _gathered_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """Sequence-sharded hidden states (tensor parallelism) gathered on every rank, as the lm_head's input."""
    return hidden.redistribute(placements=[Replicate()]) if isinstance(hidden, DTensor) else hidden


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int) -> torch.Tensor:
    if not isinstance(weight, DTensor):
        return linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    if weight.placements != (Shard(0),):
        raise ValueError(f"the lm_head weight is a DTensor with placements {weight.placements}; the chunked loss "
                         "takes it vocab-sharded (Shard(0)) over the tensor-parallel mesh")
    mesh, local_weight = weight.device_mesh, weight.to_local()
    # Every rank's loss covers all tokens over its vocabulary rows: the gradient of the gathered hidden states is
    # a partial sum over the vocabulary shards (reduce-scattered back to sequence shards).
    local_hidden = hidden.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    # parallelism.ParallelDims.validate_for requires the TP degree to divide the vocabulary: equal shards.
    return linear_cross_entropy(local_hidden, local_weight, labels, chunk_size=chunk_size,
                                vocab_group=mesh.get_group(),
                                vocab_start=mesh.get_local_rank() * local_weight.shape[0])
