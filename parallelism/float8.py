"""float8 training of nn.Linear layers via torchao (tensorwise scaling; `emulate` runs it without float8
hardware, e.g. on CPU)."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

# Kept in high precision: the output head (logit precision) and the per-head scalar projections / shared expert
# gate, whose few outputs make float8 scaling pointless and hurt accuracy. The MoE router is a TopKRouter, not
# an nn.Linear, and expert tensors are not Linears either: both stay in high precision.
HIGH_PRECISION_LINEARS = ("lm_head", "in_proj_a", "in_proj_b", "shared_expert_gate")


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for the Linear layers to convert. float8 GEMMs need both dims divisible by 16; under tensor
    parallelism the per-rank (local) dims are the ones that run."""
    if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] in HIGH_PRECISION_LINEARS:
        return False
    weight = module.weight.to_local() if isinstance(module.weight, DTensor) else module.weight
    return all(dim % 16 == 0 for dim in weight.shape)


def apply_float8(model: nn.Module, *, emulate: bool = False) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate),
                               module_filter_fn=float8_module_filter)
