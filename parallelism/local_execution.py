"""Run an unmodified qwen35 module on plain local tensors while its parameters stay DTensors.

qwen35 modules use some parameters directly (`self.A_log`, `self.conv1d.weight`, norm weights, expert tensors)
and mix them with activations, so DTensor parameters and plain activations cannot meet inside them. Instead,
for the duration of one forward call each listed parameter is replaced by a differentiable local view of it
(`to_local`, or a gather-and-slice), and put back afterwards. Parameters stay DTensors for FSDP, the optimizer
and checkpoints; gradients flow back through the views with the placements each view declares.

Submodules are looked up by name at every call, so swapping a child afterwards (float8 conversion) is safe.
The swap is undone by the forward hook, so a forward must run to the end: activation checkpointing disables
its early-stopping recompute for this reason (activation_checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, distribute_tensor

LocalView = Callable[[DTensor], torch.Tensor]
ArgsMap = Callable[[tuple], tuple]
OutputMap = Callable[[Any], Any]


def distribute_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    """Replace each named parameter (path relative to `module`) by a DTensor parameter with that placement."""
    for path, placement in placements.items():
        owner_path, _, name = path.rpartition(".")
        owner = module.get_submodule(owner_path)
        param = owner._parameters[name]
        owner.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                                    requires_grad=param.requires_grad))


def local_shard(param: DTensor) -> torch.Tensor:
    """This rank's shard; its gradient is this rank's shard of the gradient."""
    return param.to_local()


def local_replica_summed_grad(param: DTensor) -> torch.Tensor:
    """The full (replicated) parameter, for a rank that computes only part of its gradient (its heads, its
    tokens): the gradient is summed over the mesh."""
    return param.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])


def local_replica(param: DTensor) -> torch.Tensor:
    """The full (replicated) parameter, for ranks that all compute the same complete gradient."""
    return param.to_local()


def local_rows_of_blocks(block_sizes: Sequence[int], rank: int, world: int) -> LocalView:
    """Rows of a dim-0 fused parameter made of several blocks (e.g. [Q | K | V]), each split evenly by rank:
    this rank gets rows [r/w, (r+1)/w) of every block, concatenated. No DTensor placement describes that layout
    when the blocks differ in size, so the parameter is stored Shard(0) (plain contiguous storage split) and the
    view all-gathers it, then slices; the gradient is reduce-scattered back to the storage shards."""
    ranges, offset = [], 0
    for size in block_sizes:
        ranges.append((offset + rank * size // world, offset + (rank + 1) * size // world))
        offset += size

    def view(param: DTensor) -> torch.Tensor:
        full = param.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        return torch.cat([full[start:end] for start, end in ranges], dim=0)

    return view


def run_on_local_tensors(module: nn.Module, param_views: dict[str, LocalView], *, map_args: ArgsMap,
                         map_output: OutputMap) -> None:
    """Install hooks so that `module(*args, **kwargs)` runs as `module(*map_args(args), **kwargs)` with every
    parameter named in `param_views` (paths relative to `module`) replaced by its view, and returns
    `map_output(output)`."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def swap_in(mod, args, kwargs):
        for path, view in param_views.items():
            owner_path, _, name = path.rpartition(".")
            owner = mod.get_submodule(owner_path)
            original = owner._parameters[name]
            swapped.append((owner, name, original))
            owner._parameters[name] = view(original)
        return map_args(args), kwargs

    def swap_out(mod, args, kwargs, output):
        while swapped:
            owner, name, original = swapped.pop()
            owner._parameters[name] = original
        return map_output(output)

    module.register_forward_pre_hook(swap_in, with_kwargs=True)
    module.register_forward_hook(swap_out, with_kwargs=True)
