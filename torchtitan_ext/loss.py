"""The training loss: torchtitan's cross entropy (summed, divided by the global count of valid tokens) plus, for MoE
models, the router load-balancing term the model returns in training mode (`model.MoETrainingOutput`).

Scaling. torchtitan calls the loss once per microbatch and sums the results over microbatches and (through
gradients summed, not averaged, over data-parallel ranks) over ranks, so the summed cross entropy / global tokens
is the global mean. The aux term of a microbatch is weighted by its share of the global valid tokens,
`n_valid / global_valid_tokens`, so the total is

    mean cross entropy + router_aux_loss_coef * (token-weighted mean of the per-microbatch load-balancing losses)

which for one rank and one microbatch is exactly transformers' `loss + router_aux_loss_coef * aux_loss`.
Without `global_valid_tokens` (a summed loss) the weight is `n_valid`, keeping the sum convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import spmd_types as spmd
import torch
from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss

from .model import MoETrainingOutput


class Qwen35Loss(CrossEntropyLoss):
    @dataclass(kw_only=True, slots=True)
    class Config(CrossEntropyLoss.Config):
        pass

    def __call__(self, pred: torch.Tensor | MoETrainingOutput, labels: torch.Tensor,
                 global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(pred, MoETrainingOutput):
            return super().__call__(pred, labels, global_valid_tokens, **kwargs)
        loss, metrics = super().__call__(pred.logits, labels, global_valid_tokens, **kwargs)
        weight = (labels != IGNORE_INDEX).sum()
        with spmd.no_typecheck():
            if global_valid_tokens is not None:
                weight = weight / global_valid_tokens
            loss = loss + pred.aux_loss * weight
        return loss, metrics
