"""Mixed precision without FSDP: the forward runs under torch.autocast.

FSDP2 casts parameters to `MixedPrecisionPolicy.param_dtype` for compute. Without FSDP (one device, or tensor
parallelism alone) nothing would: torchtitan 0.3.0 documents `training.mixed_precision_param` as taking effect
through torch.autocast there, but no longer applies it, so such a run would silently compute in the parameters'
dtype (fp32). Here the model's forward enters torch.autocast(device of the input ids, param_dtype) instead:
matmuls and convolutions compute in that dtype from fp32 parameters, reductions stay fp32, and the backward
follows the forward's dtypes (activation-checkpoint recomputes restore the autocast state themselves).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy


_LOWER_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(model: nn.Module, mp_policy: MixedPrecisionPolicy | None) -> torch.dtype | None:
    """The dtype to run the forward in under autocast when FSDP, which would apply mixed precision, is off: a
    16-bit param_dtype different from the parameters'; else None."""
    if mp_policy is None or mp_policy.param_dtype not in _LOWER_PRECISION:
        return None
    param_dtype = next(model.parameters()).dtype
    return mp_policy.param_dtype if mp_policy.param_dtype != param_dtype else None


def apply_autocast(model: nn.Module, dtype: torch.dtype) -> None:
    """Every forward of `model` runs under torch.autocast(<device type of its first input>, dtype)."""
    active: list[torch.autocast] = []

    def enter(module, args, kwargs):
        inputs = args[0] if args else next(iter(kwargs.values()))
        context = torch.autocast(inputs.device.type, dtype=dtype)
        context.__enter__()
        active.append(context)

    def leave(module, args, kwargs, output):
        active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
