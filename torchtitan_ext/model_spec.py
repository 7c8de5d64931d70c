"""torchtitan `ModelSpec`s for every Qwen3.5 flavor (`model_registry(flavor)`, torchtitan's naming).

Pipeline parallelism follows torchtitan's `pipeline_llm` and uses its pieces: the number of stages from
`pipeline_parallel_degree`, the schedule class and `pipeline_parallel_layers_per_stage`; the even split of layers
(with `pipeline_parallel_first/last_stage_less_layers`) or `module_fqns_per_model_part`; the stage-to-rank
mapping of looped and V-shaped schedules; the schedule built with torchtitan's microbatch checks and loss wrapper.
Only the split itself is ours (parallelism.pipeline): torchtitan's `_split_module` expects its `Decoder`'s flat
module names and layer dict, the Qwen3.5 model keeps HF's names and layer list.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _PipelineSchedule

from parallelism import ParallelDims, ParallelizeSettings, parallelize
from parallelism.parallel_dims import ParallelMeshes
from parallelism.pipeline import EmbeddingCopies, needs_embedding_on_last_stage, plan_stages, split_model
from qwen35 import FLAVORS, Qwen35Config, Qwen35ForCausalLM
# torchtitan's pipelining helpers (private names in 0.3.0; pipeline_llm is built from them)
from torchtitan.distributed.pipeline_parallel import (_build_pipeline_schedule, _generate_llm_fqn_per_model_part,
                                                      _get_pipeline_metadata, _get_pp_rank_to_stage_indices_mapping)
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools.logging import logger
from torchtitan.tools import utils

from .loss import pop_loss_metrics, record_loss_metric
from .model import PipelineLoss, Qwen35TitanModel
from .state_dict_adapter import Qwen35StateDictAdapter

MODEL_NAME = "qwen35"


def _dims_and_meshes(parallel_dims) -> tuple[ParallelDims, ParallelMeshes | None]:
    """Our ParallelDims / meshes for torchtitan's ParallelDims (the same degrees and rank layout)."""
    dims = ParallelDims(dp_replicate=parallel_dims.dp_replicate, dp_shard=parallel_dims.dp_shard,
                        tp=parallel_dims.tp, ep=parallel_dims.ep, cp=parallel_dims.cp, pp=parallel_dims.pp,
                        world_size=parallel_dims.world_size)
    return dims, dims.build_meshes(utils.device_type) if parallel_dims.world_size > 1 else None


def _parallelize_part(model: Qwen35ForCausalLM, dims: ParallelDims, meshes: ParallelMeshes | None,
                      settings: ParallelizeSettings) -> None:
    stage = getattr(model, "pipeline_stage", None)
    where = "" if stage is None else f" to pipeline stage {stage.index} (layers {list(stage.layers)})"
    logger.info(f"{MODEL_NAME}: applied{where} {parallelize(model, dims, meshes, settings)}")
    # torchtitan divides the summed loss by the global token count, so gradients must be summed over
    # data-parallel ranks, not averaged (what fully_shard does by default): torchtitan's own FSDP does this.
    disable_fsdp_gradient_division(model)


def make_parallelize_fn(settings: ParallelizeSettings):
    """torchtitan calls parallelize_fn with its parallel dims and its configs; the transforms come from `settings`
    (built from the same configs by the TOML front end, where each decision is made once)."""

    def parallelize_qwen35(model: Qwen35ForCausalLM, *, parallel_dims, **torchtitan_configs) -> Qwen35ForCausalLM:
        _parallelize_part(model, *_dims_and_meshes(parallel_dims), settings)
        return model

    return parallelize_qwen35


class MicrobatchListSchedule:
    """A torch pipeline schedule driven the way torchtitan 0.3.0's trainer and validator drive it:
    `step(arg_mbs=, kwarg_mbs=, target_mbs=, losses=, loss_kwargs=, return_outputs=)` with the microbatches
    already made (one data-loader batch each, a packed row with its own cu_seqlens), the API of the nightly torch
    torchtitan pins. torch 2.13's `step` takes the whole batch and splits every tensor along dim 0, which would take
    these keywords for model inputs; this runs the schedule's own per-microbatch `_step_microbatches` after the
    per-step preparation torch's `step` does. (Only installed where the torch schedule lacks that API.)"""

    def __init__(self, schedule: _PipelineSchedule):
        self.schedule = schedule

    @staticmethod
    def needed(schedule: _PipelineSchedule) -> bool:
        return "arg_mbs" not in inspect.signature(type(schedule).step).parameters

    def step(self, *, arg_mbs: list | None = None, kwarg_mbs: list | None = None, target_mbs: list | None = None,
             losses: list | None = None, loss_kwargs: dict[str, Any] | None = None,
             return_outputs: bool = False) -> None:
        schedule = self.schedule
        if return_outputs:
            raise NotImplementedError("the last stage's outputs are not merged (torchtitan passes "
                                      "return_outputs=False)")
        if schedule._has_backward and not torch.is_grad_enabled():
            raise RuntimeError("a training step of the pipeline needs gradients enabled; use eval()")
        stages = schedule._stages if isinstance(schedule, PipelineScheduleMulti) else [schedule._stage]
        for stage in stages:
            stage.has_backward = schedule._has_backward
            stage.clear_runtime_states()
        schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs)

    def eval(self, **microbatches) -> None:
        schedule = self.schedule
        has_backward, schedule._has_backward = schedule._has_backward, False
        try:
            self.step(**microbatches)
        finally:
            schedule._has_backward = has_backward


def _drop_loss_metrics_of_shape_inference(schedule: _PipelineSchedule) -> None:
    """At its first step torch's schedule infers the stages' tensor metadata by running each stage's forward, and
    the last stage's loss, on tensors of the first microbatch's shapes (a later stage's inputs uninitialised): the
    loss terms that call records (e.g. mtp_loss) are no microbatch's, so they are dropped."""
    initialize = schedule._initialize_pp_stages  # torch 2.13: the one place that inference runs

    def initialize_without_recording(*args, **kwargs):
        recorded = pop_loss_metrics()
        try:
            return initialize(*args, **kwargs)
        finally:
            pop_loss_metrics()
            for name, value in recorded.items():
                record_loss_metric(name, value)

    schedule._initialize_pp_stages = initialize_without_recording


def make_pipelining_fn(settings: ParallelizeSettings):
    """torchtitan's `pipelining_fn`: (schedule, this rank's stage models, has first stage, has last stage)."""

    def pipeline_qwen35(model: Qwen35TitanModel, *, parallel_dims, training, parallelism, device: torch.device,
                        model_config: Qwen35TitanModel.Config, loss_fn, **torchtitan_configs):
        architecture = model_config.architecture
        if parallel_dims.cp > 1:
            raise NotImplementedError("parallelism.pipeline_parallel_degree > 1 with context_parallel_degree > 1 "
                                      "is not supported yet")
        # torchtitan reads the layer count from a Decoder config's `layers`
        num_stages, num_layers, input_weight, output_weight = _get_pipeline_metadata(
            parallel_dims, parallelism, types.SimpleNamespace(layers=architecture.layer_types))
        names, key = parallelism.module_fqns_per_model_part, "[parallelism] module_fqns_per_model_part"
        if names is None:
            names, key = (_generate_llm_fqn_per_model_part(num_stages, num_layers, input_weight, output_weight),
                          "the split of pipeline_parallel_degree / pipeline_parallel_layers_per_stage")
        plans = plan_stages(names, num_layers, key)
        dims, meshes = _dims_and_meshes(parallel_dims)
        pp_mesh = meshes.pp
        schedule_name = parallelism.pipeline_parallel_schedule

        def stages_of(pp_rank: int) -> tuple[int, ...]:
            return _get_pp_rank_to_stage_indices_mapping(pp_rank, dims.pp, schedule_name, len(plans))

        def get_mesh(dim_names: tuple[str, ...], layout) -> DeviceMesh | None:
            """The mesh of a DTensor a stage receives (tensor-parallel hidden states): torch rebuilds it by name."""
            mesh = {("tp",): meshes.tp}.get(tuple(dim_names))
            return mesh if mesh is not None and (layout is None or mesh._layout == layout) else None

        stages, parts = [], []
        for index in stages_of(pp_mesh.get_local_rank()):
            part = split_model(model, plans[index])
            _parallelize_part(part, dims, meshes, settings)
            stages.append(PipelineStage(part, index, len(plans), device, group=pp_mesh.get_group(),
                                        get_mesh=get_mesh))
            parts.append(part)
        schedule = _build_pipeline_schedule(parallelism=parallelism, local_batch_size=training.local_batch_size,
                                            stages=stages,
                                            loss_fn=PipelineLoss(loss_fn, architecture, meshes.stage.get_group()))
        _drop_loss_metrics_of_shape_inference(schedule)
        if MicrobatchListSchedule.needed(schedule):
            schedule = MicrobatchListSchedule(schedule)
        if architecture.tie_word_embeddings or needs_embedding_on_last_stage(model):
            holder = {index: pp_rank for pp_rank in range(dims.pp) for index in stages_of(pp_rank)}
            pp_ranks = pp_mesh.mesh.tolist()  # global ranks of this rank's pipeline
            local = {part.pipeline_stage.index: part for part in parts}
            copies = EmbeddingCopies(local.get(0), local.get(len(plans) - 1), pp_ranks[holder[0]],
                                     pp_ranks[holder[len(plans) - 1]], pp_mesh.get_group())
            for part in parts:
                part.embedding_copies = copies
        return (schedule, parts, any(s.is_first for s in stages), any(s.is_last for s in stages))

    return pipeline_qwen35


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
        pipelining_fn=make_pipelining_fn(settings),
        post_optimizer_build_fn=None,
        state_dict_adapter=Qwen35StateDictAdapter,
    )
