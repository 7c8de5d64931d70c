"""torchtitan `ModelSpec`s for every Qwen3.5 flavor (`model_registry(flavor)`, torchtitan's naming)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.fsdp import MixedPrecisionPolicy

from parallelism import ParallelDims, parallelize
from parallelism.autocast import autocast_dtype
from qwen35 import FLAVORS, Qwen35Config, Qwen35ForCausalLM
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from .model import Qwen35TitanModel
from .state_dict_adapter import Qwen35StateDictAdapter

MODEL_NAME = "qwen35"


@dataclass(frozen=True)
class Float8Settings:
    """torchao float8 (tensorwise) training of the nn.Linear layers, applied by parallelism.parallelize."""

    emulate: bool = False  # float8 numerics without float8 hardware (CPU, pre-SM89 GPUs)


_AC_MODES = {None: "none", SelectiveAC.Config: "selective", FullAC.Config: "full"}


def make_parallelize_fn(float8: Float8Settings | None):
    """torchtitan calls parallelize_fn with its parallel dims and configs; float8 is not among them (upstream it
    is a model-config converter), so it is bound here."""

    def parallelize_qwen35(model: Qwen35ForCausalLM, *, parallel_dims, training, parallelism, compile_config,
                           ac_config, dump_folder) -> Qwen35ForCausalLM:
        if parallel_dims.pp_enabled:
            raise NotImplementedError(f"{MODEL_NAME}: pipeline parallelism is not supported "
                                      "(parallelism.pipeline_parallel_degree must be 1)")
        dims = ParallelDims(dp_replicate=parallel_dims.dp_replicate, dp_shard=parallel_dims.dp_shard,
                            tp=parallel_dims.tp, ep=parallel_dims.ep, cp=parallel_dims.cp,
                            world_size=parallel_dims.world_size)
        meshes = dims.build_meshes(device_type) if parallel_dims.world_size > 1 else None
        mp_policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
                                         reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce])
        autocast = autocast_dtype(model, dims, mp_policy)  # mixed precision without FSDP (parallelism.autocast)
        parallelize(model, dims, meshes, ac=_AC_MODES[type(ac_config) if ac_config else None],
                    compile=compile_config.enable and "model" in compile_config.components,
                    compile_backend=compile_config.backend, float8=float8 is not None,
                    float8_emulate=float8 is not None and float8.emulate, mp_policy=mp_policy,
                    loss_parallel=dims.tp > 1)  # as torchtitan's models: its cross entropy takes vocab shards
        applied = [f"{k}={v}" for k, v in (("dp_replicate", dims.dp_replicate), ("dp_shard", dims.dp_shard),
                                              ("cp", dims.cp), ("tp", dims.tp), ("ep", dims.ep)) if v > 1]
        if ac_config:
            applied.append(f"ac={_AC_MODES[type(ac_config)]}")
        if compile_config.enable and "model" in compile_config.components:
            applied.append(f"compile(backend={compile_config.backend})")
        if float8 is not None:
            applied.append(f"float8({'emulated' if float8.emulate else 'hardware'})")
        if dims.tp > 1:
            applied.append("loss_parallel")
        if autocast is not None:
            applied.append(f"autocast({str(autocast).removeprefix('torch.')})")
        logger.info(f"{MODEL_NAME}: applied {', '.join(applied) or 'no parallelism or transforms'}")
        # torchtitan divides the summed loss by the global token count, so gradients must be summed over
        # data-parallel ranks, not averaged (what fully_shard does by default): torchtitan's own FSDP does this.
        disable_fsdp_gradient_division(model)
        return model

    return parallelize_qwen35


def model_registry(flavor: str, *, float8: Float8Settings | None = None,
                   architecture: Qwen35Config | None = None) -> ModelSpec:
    """architecture: the flavor's config with overrides (TOML [model] keys such as tie_word_embeddings);
    default the flavor's own."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown Qwen3.5 flavor {flavor!r}; known flavors: {', '.join(FLAVORS)}")
    return ModelSpec(
        name=MODEL_NAME,
        flavor=flavor,
        model=Qwen35TitanModel.Config(flavor=flavor, architecture=architecture or Qwen35Config.from_flavor(flavor)),
        parallelize_fn=make_parallelize_fn(float8),
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=Qwen35StateDictAdapter,
    )
