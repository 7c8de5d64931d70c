"""torchtitan `ModelSpec`s for every Qwen3.5 flavor (`model_registry(flavor)`, torchtitan's naming)."""

from __future__ import annotations

from parallelism import ParallelDims, ParallelizeSettings, parallelize
from qwen35 import FLAVORS, Qwen35Config, Qwen35ForCausalLM
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools.logging import logger
from torchtitan.tools import utils

from .model import Qwen35TitanModel
from .state_dict_adapter import Qwen35StateDictAdapter

MODEL_NAME = "qwen35"


def make_parallelize_fn(settings: ParallelizeSettings):
    """torchtitan calls parallelize_fn with its parallel dims and its configs; the transforms come from `settings`
    (built from the same configs by the TOML front end, where each decision is made once)."""

    def parallelize_qwen35(model: Qwen35ForCausalLM, *, parallel_dims, **torchtitan_configs) -> Qwen35ForCausalLM:
        if parallel_dims.pp_enabled:
            raise NotImplementedError(f"{MODEL_NAME}: pipeline parallelism is not supported "
                                      "(parallelism.pipeline_parallel_degree must be 1)")
        dims = ParallelDims(dp_replicate=parallel_dims.dp_replicate, dp_shard=parallel_dims.dp_shard,
                            tp=parallel_dims.tp, ep=parallel_dims.ep, cp=parallel_dims.cp,
                            world_size=parallel_dims.world_size)
        meshes = dims.build_meshes(utils.device_type) if parallel_dims.world_size > 1 else None
        logger.info(f"{MODEL_NAME}: applied {parallelize(model, dims, meshes, settings)}")
        # torchtitan divides the summed loss by the global token count, so gradients must be summed over
        # data-parallel ranks, not averaged (what fully_shard does by default): torchtitan's own FSDP does this.
        disable_fsdp_gradient_division(model)
        return model

    return parallelize_qwen35


def model_registry(flavor: str, *, settings: ParallelizeSettings = ParallelizeSettings(),
                   architecture: Qwen35Config | None = None) -> ModelSpec:
    """architecture: the flavor's config with overrides (TOML [model] keys such as tie_word_embeddings);
    default the flavor's own."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown Qwen3.5 flavor {flavor!r}; known flavors: {', '.join(FLAVORS)}")
    return ModelSpec(
        name=MODEL_NAME,
        flavor=flavor,
        model=Qwen35TitanModel.Config(flavor=flavor, architecture=architecture or Qwen35Config.from_flavor(flavor)),
        parallelize_fn=make_parallelize_fn(settings),
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=Qwen35StateDictAdapter,
    )
