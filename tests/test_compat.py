"""torchtitan_ext.compat: importing patches nothing, apply() works in any import order, and per shim a test that
fails once the installed torch / torchtitan no longer need it (then delete the shim and its test)."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from torchtitan_ext import compat

REPO = Path(__file__).resolve().parent.parent

IMPORT_ORDER = """
import torch, torch.utils.checkpoint
from torch.distributed.fsdp import FSDPModule
originals = (torch._utils._get_available_device_type, torch._utils._get_device_module,
             FSDPModule.set_gradient_divide_factor, frozenset(torch.utils.checkpoint.SAC_IGNORED_OPS))
import qwen35, kernels, parallelism, torchtitan_ext, torchtitan_ext.train  # library packages + trainer module
assert (torch._utils._get_available_device_type, torch._utils._get_device_module,
        FSDPModule.set_gradient_divide_factor, frozenset(torch.utils.checkpoint.SAC_IGNORED_OPS)) == originals
import torchtitan.components.metrics as metrics, torchtitan.distributed.utils as dist_utils
from torchtitan.tools import utils
assert utils.device_type == dist_utils.device_type == "cuda"  # torchtitan imported first: the CPU-only fallback
from torchtitan_ext import compat
compat.apply()
assert utils.device_type == dist_utils.device_type == "cpu"
cpu_module = torch._utils._get_device_module("cpu")
assert metrics.device_module is dist_utils.device_module is utils.device_module is cpu_module
"""


@pytest.mark.skipif(not compat.cpu_only(), reason="the device shim is for machines without an accelerator")
def test_imports_patch_nothing_and_apply_works_after_torchtitan_is_imported():
    subprocess.run([sys.executable, "-c", IMPORT_ORDER], cwd=REPO, check=True, timeout=300)


def test_device_shim_still_needed_torchtitan_falls_back_to_cuda(monkeypatch):
    from torchtitan.tools import utils

    monkeypatch.setattr(utils, "_get_available_device_type", lambda: None)  # what CPU-only torch reports
    assert utils.get_device_info()[0] == "cuda"


def test_set_timeout_shim_still_needed_torch_lacks_it():
    assert dist.set_timeout is compat._set_timeout  # installed by apply() only where torch has none


def _premul_sum_on_gloo() -> str:
    try:
        dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(1.0))
    except RuntimeError as err:
        return str(err)
    return "supported"


def test_gloo_reduce_op_shim_still_needed_gloo_rejects_premul_sum():
    assert "PREMUL_SUM" in run_distributed(_premul_sum_on_gloo, world_size=1)


def test_cpu_sharded_init_shim_still_needed_dtensor_rng_has_no_cpu_support():
    from torch.distributed.tensor._random import is_rng_supported_mesh

    with pytest.warns(UserWarning, match="may not have complete support on cpu"):
        assert not is_rng_supported_mesh(types.SimpleNamespace(device_type="cpu"))


def _fully_shard_plain_parameter_on_spmd_mesh() -> str:
    """What torchtitan's spmd_types backend asks of fully_shard: a plain parameter on the full SPMD mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import DataParallelMeshDims, fully_shard

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    try:
        fully_shard(torch.nn.Linear(4, 4), mesh=mesh, dp_mesh_dims=DataParallelMeshDims(shard="fsdp"))
    except (ValueError, NotImplementedError) as err:  # NotImplementedError: compat's stand-in (torch 2.11)
        return str(err)
    return "sharded"


def test_spmd_backend_default_still_needed_fully_shard_refuses_plain_parameters_on_spmd_meshes():
    """The probe compat decides by agrees with fully_shard itself, and both still say no."""
    refusal = run_distributed(_fully_shard_plain_parameter_on_spmd_mesh)
    assert "must be DTensors" in refusal or "DataParallelMeshDims" in refusal
    assert not compat.fully_shard_understands_spmd_types()
    assert compat.default_spmd_backend() == "partial_dtensor"


def test_data_parallel_mesh_dims_stand_in_only_where_torch_lacks_it(monkeypatch):
    """torch 2.11 has no torch.distributed.fsdp.DataParallelMeshDims, which torchtitan's trainer imports: compat
    installs a stand-in that imports and refuses construction; a torch that has the class keeps its own."""
    import torch
    import torch.distributed.fsdp as fsdp

    has_class = torch.torch_version.TorchVersion(torch.__version__) >= "2.12"
    assert (fsdp.DataParallelMeshDims.__module__ == "torch.distributed.fsdp") == has_class
    monkeypatch.delattr(fsdp, "DataParallelMeshDims")
    compat._install_data_parallel_mesh_dims_stand_in()
    from torch.distributed.fsdp import DataParallelMeshDims

    with pytest.raises(NotImplementedError, match="has no torch.distributed.fsdp.DataParallelMeshDims"):
        DataParallelMeshDims(shard="fsdp")


ENTRY_POINT_WITHOUT_MESH_DIMS = """
import runpy, sys
import torch.distributed.fsdp as fsdp
del fsdp.DataParallelMeshDims  # as on torch 2.11, where importing torchtitan's trainer needs the stand-in
sys.argv = ["train", "--config", "train_configs/debug.toml", "--print-config"]
runpy.run_module("torchtitan_ext.train", run_name="__main__")
"""


def test_train_entry_point_applies_the_shims_before_importing_torchtitans_trainer():
    """`python -m torchtitan_ext.train` on a torch without DataParallelMeshDims (2.11): the module imports no
    torchtitan trainer at the top, so main() installs the stand-in first and runs."""
    printed = subprocess.run([sys.executable, "-c", ENTRY_POINT_WITHOUT_MESH_DIMS], cwd=REPO, check=True,
                             timeout=300, capture_output=True, text=True).stdout
    assert 'flavor = "debug"' in printed
