"""Expert parallelism: each rank of the EP mesh holds num_experts / ep consecutive experts and tokens travel to
them by all-to-all.

`GroupedExperts.forward(x, expert_ids, weights)` is kept as is and wrapped:
- dispatch (before): sort this rank's (token, slot) pairs by expert, exchange per-expert counts, all-to-all the
  token rows to the ranks owning their experts; the wrapped forward then runs on the received rows with their
  *local* expert ids and unit weights (each row is one (token, expert) pair), on the local expert weights;
- combine (after): all-to-all the expert outputs back, weight them by the router weights and sum per token.
The expert tensors are DTensors sharded Shard(0) over the EP mesh (global shape and layout = HF's).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from qwen35 import Qwen35ForCausalLM
from qwen35.moe import GroupedExperts, SparseMoE

from .local_execution import distribute_parameters, local_shard, run_on_local_tensors


def apply_expert_parallel(model: Qwen35ForCausalLM, ep_mesh: DeviceMesh) -> None:
    for layer in model.decoder_layers():  # the MTP head's MoE layer included
        if isinstance(layer.mlp, SparseMoE):
            _shard_experts(layer.mlp.experts, ep_mesh)


def _shard_experts(experts: GroupedExperts, mesh: DeviceMesh) -> None:
    distribute_parameters(experts, mesh, {"gate_up_proj": Shard(0), "down_proj": Shard(0)})
    exchange = _TokenExchange(mesh, experts.num_experts)
    run_on_local_tensors(experts, {"gate_up_proj": local_shard, "down_proj": local_shard},
                         map_args=exchange.dispatch, map_output=exchange.combine)
    experts.num_experts = exchange.local_experts


class _TokenExchange:
    def __init__(self, mesh: DeviceMesh, num_experts: int):
        self.mesh = mesh
        self.ep = mesh.size()
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        self._in_flight: list[tuple] = []  # what combine needs from the matching dispatch

    def dispatch(self, args: tuple) -> tuple:
        x, expert_ids, weights = args
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        sent_per_expert = torch.bincount(flat_ids, minlength=self.num_experts)
        # received_per_expert[s * local + e]: rows that source rank s sends to this rank's local expert e
        received_per_expert = funcol.all_to_all_single(sent_per_expert, None, None, self.mesh).wait()
        send_splits = sent_per_expert.view(self.ep, self.local_experts).sum(1).tolist()
        recv_splits = received_per_expert.view(self.ep, self.local_experts).sum(1).tolist()
        received = funcol.all_to_all_single_autograd(x[order // top_k], recv_splits, send_splits, self.mesh)
        local_ids = torch.repeat_interleave(
            torch.arange(self.local_experts, device=x.device).repeat(self.ep), received_per_expert)
        self._in_flight.append((x, order, weights, top_k, send_splits, recv_splits))
        unit_weights = torch.ones(received.shape[0], 1, dtype=weights.dtype, device=weights.device)
        return received, local_ids[:, None], unit_weights

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        x, order, weights, top_k, send_splits, recv_splits = self._in_flight.pop()
        returned = funcol.all_to_all_single_autograd(expert_out, send_splits, recv_splits, self.mesh)
        returned = returned * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, order // top_k, returned.to(x.dtype))
