"""Sparse MoE block: softmax router -> top-k -> renormalise, fused 3-D experts run as grouped GEMMs over
tokens sorted by expert, plus a shared SwiGLU expert behind a sigmoid gate."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen35Config
from .layers import SwiGLU


class TopKRouter(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.init_std = config.initializer_range
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (router logits [N, E], top-k weights [N, k] renormalised, expert ids [N, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts


class GroupedExperts(nn.Module):
    """All experts' SwiGLU weights in HF's fused layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_experts = config.num_experts
        self.init_std = config.initializer_range
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, inter))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, self.init_std)
        nn.init.normal_(self.down_proj, 0.0, self.init_std)

    def _aligned_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up_proj and down_proj with the intermediate size zero-padded to a multiple of 8, as
        torch._grouped_mm's 16-byte stride alignment needs (transformers' tester configs use 12). The padded
        units compute silu(0) * 0 = 0 and meet zero columns of down_proj, so the output is unchanged."""
        pad = -self.down_proj.shape[-1] % 8
        if not pad:
            return self.gate_up_proj, self.down_proj
        experts, double_inter, hidden = self.gate_up_proj.shape
        gate_up = F.pad(self.gate_up_proj.reshape(experts, 2, double_inter // 2, hidden), (0, 0, 0, pad))
        return gate_up.reshape(experts, double_inter + 2 * pad, hidden), F.pad(self.down_proj, (0, pad))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, weights [N, k] -> sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of_slot = order // top_k
        # per-expert counts with a static shape (bincount's output size is data-dependent under torch.compile)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        group_ends = counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32)).cumsum(0)
        group_ends = group_ends.to(torch.int32)
        gate_up_proj, down_proj = self._aligned_weights()
        hidden = torch._grouped_mm(x[token_of_slot], gate_up_proj.transpose(-2, -1), offs=group_ends)
        gate, up = hidden.chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=group_ends)
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of_slot, out.to(x.dtype))


class SparseMoE(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = GroupedExperts(config)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (output [B, T, H], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, expert_ids = self.gate(flat)
        routed = self.experts(flat, expert_ids, weights)
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed + shared).view_as(x), logits


class RouterStatistics(NamedTuple):
    """What the load-balancing loss needs from the router logits of one forward, as sums over all MoE layers'
    (layer, token) rows, so that the statistics of several forwards (data-parallel ranks) combine by addition."""

    assignments: torch.Tensor  # [E] int64: top-k assignments to each expert (no gradient)
    prob_sum: torch.Tensor  # [E] float32: router probability of each expert summed over the rows (differentiable)
    rows: int | torch.Tensor  # number of (layer, token) rows (a 0-d int64 tensor when a row mask selected them)

    def merged(self, other: "RouterStatistics") -> "RouterStatistics":
        """The statistics of the rows of both (e.g. the main model's MoE layers and the MTP head's)."""
        return RouterStatistics(self.assignments + other.assignments, self.prob_sum + other.prob_sum,
                                self.rows + other.rows)


def router_statistics(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                      row_mask: torch.Tensor | None = None) -> RouterStatistics:
    """The sums behind `load_balancing_loss` for router logits [N_l, E] of each MoE layer; with `row_mask` [N_l]
    (bool), only the rows it marks (no host sync: the row count stays on device)."""
    assignments = torch.zeros(num_experts, dtype=torch.int64, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        experts = torch.topk(probs, top_k, dim=-1).indices
        counted = torch.ones_like(experts) if row_mask is None else row_mask[:, None].expand_as(experts).long()
        assignments = assignments.scatter_add(0, experts.reshape(-1), counted.reshape(-1))
        if row_mask is None:
            prob_sum, rows = prob_sum + probs.sum(0), rows + logits.shape[0]
        else:
            prob_sum, rows = prob_sum + (probs * row_mask[:, None]).sum(0), rows + row_mask.sum()
    return RouterStatistics(assignments, prob_sum, rows)


def balancing_loss_share(prob_sum: torch.Tensor, assignments: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    """E * sum_e (assignments_e / rows) * (prob_sum_e / rows). With the statistics of all rows this is the
    load-balancing loss; with `assignments` and `rows` of all rows but `prob_sum` of a subset, it is that subset's
    additive share of it (the shares of disjoint subsets sum to the loss, and so do their gradients)."""
    return assignments.shape[0] * torch.sum((assignments / rows) * (prob_sum / rows))


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss over all MoE layers' tokens jointly (transformers' definition, unscaled):
    E * sum_e f_e * P_e with f_e the fraction of top-k assignments and P_e the mean router probability."""
    stats = router_statistics(router_logits, num_experts, top_k)
    return balancing_loss_share(stats.prob_sum, stats.assignments, stats.rows)
