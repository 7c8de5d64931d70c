"""torchtitan's Trainer with Qwen3.5's context parallelism.

torchtitan shards a context-parallel batch with torch's `context_parallel` (round-robin load balancing of the
sequence), which fits attention but not a recurrence. Under `[parallelism] context_parallel_degree = C`, the
Qwen3.5 parallelize function gives the model a `context_parallel` (`parallelism.context_parallel`) instead, and
this trainer gives each CP rank its T / C consecutive tokens: input ids, labels, positions and cu_seqlens of the
packed row. Everything else is torchtitan's: the CP ranks read the same batch (its data-parallel "batch" mesh
excludes them), the loss is normalised by the valid tokens of the whole (unsplit) global batch, FSDP shards over
dp_shard x cp and sums their partial gradients, and the logged loss sums over the data-parallel and CP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.trainer import Trainer


class Qwen35Trainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def post_dataloading_process(self, input_dict: dict[str, torch.Tensor],
                                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        context_parallel = getattr(self.model_parts[0], "context_parallel", None)
        if context_parallel is None:
            return super().post_dataloading_process(input_dict, labels)
        if self.config.parallelism.spmd_backend != "partial_dtensor":
            raise ValueError("parallelism.context_parallel_degree > 1 needs parallelism.spmd_backend = "
                             f"'partial_dtensor', got {self.config.parallelism.spmd_backend!r}")
        inputs = input_dict["input"]
        shard = context_parallel.shard(input_dict["cu_seqlens"], inputs.shape[1])
        window = slice(shard.start, shard.end)
        labels = labels[:, window]
        self.ntokens_seen += labels.numel()  # as torchtitan counts: the tokens this rank processes
        extra_kwargs = {k: v for k, v in input_dict.items() if k not in ("input", "cu_seqlens")}
        extra_kwargs.update(cu_seqlens=shard.cu_seqlens, position_ids=shard.position_ids)
        return inputs[:, window], labels, extra_kwargs
