"""Run torchtitan 0.3.0 (written against a PyTorch nightly) on stable torch 2.13 and 2.11 and on CPU-only machines.

The only module that patches torch or torchtitan. Nothing is patched at import: entry points (the trainer's
`main` and `run`, the test session) call `apply()`, before or after torchtitan is imported. Each shim says the
versions it is for and the symptom it fixes, checks whether it is needed and does nothing otherwise, so on a CUDA
machine with a torch that has everything, `apply()` changes nothing. tests/test_compat.py has, per shim, a test
that fails once the installed versions no longer need it. See shared/reference/torchtitan-0.3.md sections 1 and 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import types
from collections import namedtuple
from datetime import timedelta

import torch
import torch.distributed as dist

_applied = False


def cpu_only() -> bool:
    return not torch.accelerator.is_available()


# ---------------------------------------------------------------------------------------------- device
_CpuProperties = namedtuple("_CpuProperties", ["name", "total_memory"])


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_memory_stats(device=None) -> dict[str, int]:
    """The process's peak resident set size in the keys torchtitan reads from CUDA's allocator statistics
    (active and reserved peaks are the same number here; it cannot be reset)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak, "num_alloc_retries": 0, "num_ooms": 0}


def _make_cpu_device_module() -> types.ModuleType:
    """`torch.cpu` plus the CUDA-style calls torchtitan makes on its device module (trainer.set_device,
    metrics.DeviceMemoryMonitor, set_pg_timeouts' barrier)."""
    module = types.ModuleType("torchtitan_ext.compat.cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.current_device = lambda: 0  # torch.cpu returns "cpu"; torchtitan passes it as a device index
    module.set_device = lambda device: None
    module.device_count = lambda: 1
    module.get_device_name = lambda device=None: "cpu"
    module.get_device_properties = lambda device=None: _CpuProperties("cpu", _total_memory_bytes())
    module.memory_stats = _cpu_memory_stats
    module.reset_peak_memory_stats = lambda device=None: None
    module.empty_cache = lambda: None
    module.manual_seed = lambda seed: None  # torch.manual_seed already seeds the CPU generator
    module.manual_seed_all = lambda seed: None
    return module


def _install_cpu_device_module() -> None:
    """torchtitan 0.3.0, any torch, CPU-only machines. Symptom: `Trainer.__init__` dies in `set_device` with
    "module 'torch._C' has no attribute '_cuda_setDevice'": `torchtitan.tools.utils.get_device_info` falls back to
    "cuda" and `torch.cuda` when torch reports no accelerator. Report "cpu" with a usable module; `init_process_group`
    then picks gloo (torch's default backend for cpu). torchtitan modules imported earlier copied the wrong
    `device_type` / `device_module` into their namespaces: they are repointed, so import order does not matter."""
    cpu_module = _make_cpu_device_module()
    original_get_device_module = torch._utils._get_device_module

    def get_device_module(device_type=None):
        if device_type == "cpu":
            return cpu_module
        return original_get_device_module(device_type)

    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = get_device_module
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("torchtitan", "torchtitan_ext") and module is not None:
            if getattr(module, "device_type", None) == "cuda":
                module.device_type = "cpu"
            if getattr(module, "device_module", None) is torch.cuda:
                module.device_module = cpu_module


# ---------------------------------------------------------------------------------------------- distributed
def _set_timeout(timeout: timedelta, group=None) -> None:
    dist.distributed_c10d._set_pg_timeout(timeout, group)


def _install_set_timeout() -> None:
    """torchtitan 0.3.0 on torch 2.11-2.13. Symptom: right after step 1, "module 'torch.distributed' has no
    attribute 'set_timeout'" (`distributed.utils.set_pg_timeouts` calls an API of torch nightlies). Delegate to the
    private c10d function stable torch has."""
    dist.set_timeout = _set_timeout


def _install_gloo_fsdp_reduce_op() -> None:
    """torchtitan 0.3.0 on torch 2.11-2.13 with gloo (CPU). Symptom: the first backward of an FSDP run fails with
    "Cannot use ReduceOp.PREMUL_SUM with Gloo": torchtitan calls `set_gradient_divide_factor(1.0)` on every FSDP
    module, so FSDP2 reduces with PREMUL_SUM(1.0). Also force a plain SUM, identical for a factor of 1.0."""
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        if factor == 1.0:
            self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def _install_data_parallel_mesh_dims_stand_in() -> None:
    """torchtitan 0.3.0 on torch 2.11. Symptom: `import torchtitan.trainer` fails: the trainer imports
    `torchtitan.distributed.full_dtensor`, which imports `torch.distributed.fsdp.DataParallelMeshDims` (new in torch
    2.12). Only torchtitan's "full_dtensor" spmd backend and its own models' FSDP helpers construct one; Qwen3.5's
    parallelize hands `fully_shard` a mesh. Install a stand-in that imports and refuses construction, naming the
    torch version."""
    import torch.distributed.fsdp as fsdp

    class DataParallelMeshDims:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(
                f"torch {torch.__version__} has no torch.distributed.fsdp.DataParallelMeshDims (torch >= 2.12 has "
                "it): torchtitan's full_dtensor spmd backend needs a newer torch")

    fsdp.DataParallelMeshDims = DataParallelMeshDims


def fully_shard_understands_spmd_types() -> bool:
    """torch nightlies teach FSDP2 about spmd_types annotations; stable 2.11-2.13 do not, so torchtitan 0.3.0's
    default `spmd_backend = "spmd_types"` fails for any FSDP degree > 1 ("all parameters must be DTensors on the
    full SPMD mesh"). Probe: hand FSDP2's parameter code a plain parameter on an SPMD data-parallel mesh, as that
    backend does (a stand-in parameter record: no process group needed). torch 2.12-2.13 refuse it; 2.11 has no
    SPMD meshes (no FSDPMeshInfo.dp_mesh_dims). tests/test_compat.py checks this answer against fully_shard itself."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.tensor import Shard

    if "dp_mesh_dims" not in {field.name for field in dataclasses.fields(FSDPMeshInfo)}:
        return False
    record = types.SimpleNamespace(mesh_info=types.SimpleNamespace(is_spmd_mesh=True), is_dtensor=False,
                                   _module_info=types.SimpleNamespace(param_name="probe"))
    try:
        FSDPParam._init_sharding_spec(record, torch.nn.Parameter(torch.zeros(2)), Shard(0), 0)
    except ValueError as err:
        return "must be DTensors" not in str(err)
    except Exception:  # past the plain-parameter check; the stand-in lacks what sharding itself needs
        return True
    return True


def default_spmd_backend() -> str:
    """Upstream default "spmd_types" where torch supports it, else "partial_dtensor" (what upstream used
    before spmd_types and what its Qwen3.5 parallelize path still supports)."""
    return "spmd_types" if fully_shard_understands_spmd_types() else "partial_dtensor"


# ---------------------------------------------------------------------------------------------- init
@contextlib.contextmanager
def _unsharded_parameters(model: torch.nn.Module):
    """Within the block, every CPU DTensor parameter of `model` is replaced by a plain full-size tensor; on exit
    each rank copies its shard of the full tensor back into the DTensor and the DTensors are put back. A
    parameter shared by several modules (tied embeddings) maps to one full tensor, so ties survive."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    full_of: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.device_mesh.device_type == "cpu":
                if id(param) not in full_of:
                    full_of[id(param)] = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype, device="cpu"), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = full_of[id(param)]
    try:
        yield
    finally:
        done: set[int] = set()
        for module, name, param in swapped:
            module._parameters[name] = param
            if id(param) not in done:
                done.add(id(param))
                local = distribute_tensor(full_of[id(param)].detach(), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()  # src_data_rank=None: no comms
                param.to_local().copy_(local)


def _install_cpu_sharded_init() -> None:
    """torchtitan 0.3.0 on torch 2.11-2.13, CPU meshes. Symptom: FSDP/TP shards of a weight are copies of each other
    and no run matches a 1-process run with the same seed. torchtitan initialises a parallelized model in place
    (`init_weights` after `to_empty`) and relies on DTensor's RNG tracker to give each shard its own slice of the
    random stream; torch's OffsetBasedRNGTracker supports no CPU mesh, so every rank draws the same numbers for its
    local shard. On CPU meshes, run the init on full-size plain parameters (every rank draws the whole tensor from
    the same seeded stream, as one process would) and keep each rank's shard. Costs one full copy of the parameters
    per rank during init; CPU runs are small."""
    from torchtitan.protocols.model import BaseModel

    original = BaseModel.init_weights

    def init_weights(self, **kwargs) -> None:
        with _unsharded_parameters(self):
            original(self, **kwargs)

    BaseModel.init_weights = init_weights


# ---------------------------------------------------------------------------------------------- entry
def apply() -> None:
    """Install the shims this torch build and machine need. Idempotent; before or after torchtitan is imported."""
    global _applied
    if _applied:
        return
    if cpu_only():
        _install_cpu_device_module()
        _install_gloo_fsdp_reduce_op()  # CPU runs use gloo; NCCL supports PREMUL_SUM
        _install_cpu_sharded_init()
    if not hasattr(dist, "set_timeout"):
        _install_set_timeout()
    import torch.distributed.fsdp

    if not hasattr(torch.distributed.fsdp, "DataParallelMeshDims"):
        _install_data_parallel_mesh_dims_stand_in()
    _applied = True
