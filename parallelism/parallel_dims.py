"""Parallel degrees, their validation against a Qwen3.5 config, and the device mesh they describe.

Layout (torchtitan's): world = pp * dp_replicate * dp_shard * cp * tp, pipeline stages outermost: the meshes
below are those of this rank's pipeline stage (`stage`: all its ranks). Context parallelism (cp) splits each sequence
over ranks that see the same batch; FSDP shards over dp_shard x cp, which sums the cp ranks' partial gradients.
Expert parallelism borrows ranks from dp_shard, so dp_shard = efsdp * ep: an EP group is a set of data-parallel
ranks that exchange tokens, and expert weights are FSDP-sharded over the remaining efsdp ranks only. The meshes
are kept in a ParallelMeshes (slicing flattened dims out of the root mesh is deprecated in torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from qwen35 import Qwen35Config


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the ranks left over after dp_replicate, cp and tp
    tp: int = 1
    ep: int = 1
    world_size: int = 1
    cp: int = 1
    pp: int = 1  # pipeline stages (parallelism.pipeline)

    def __post_init__(self):
        for key in ("dp_replicate", "tp", "ep", "world_size", "cp", "pp"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallelism.{key} must be a positive integer, got {value!r}")
        # the pipeline degree is named only where it is used
        pp_names, pp_values = ("pp * ", f"{self.pp} * ") if self.pp > 1 else ("", "")
        if self.dp_shard == -1:
            others = self.pp * self.dp_replicate * self.cp * self.tp
            if self.world_size % others:
                raise ValueError(f"parallelism: world size {self.world_size} is not divisible by {pp_names}"
                                 f"dp_replicate * cp * tp = {pp_values}{self.dp_replicate} * {self.cp} * {self.tp}, "
                                 "so dp_shard=-1 cannot fill it")
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ValueError(f"parallelism.dp_shard must be a positive integer or -1, got {self.dp_shard!r}")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(f"parallelism: {pp_names}dp_replicate * dp_shard * cp * tp = {pp_values}"
                             f"{self.dp_replicate} * {self.dp_shard} * {self.cp} * {self.tp} = {product} must equal "
                             f"the world size {self.world_size}")
        if self.cp > 1 and (self.dp_replicate > 1 or self.ep > 1):
            raise ValueError(f"parallelism.cp={self.cp} does not compose with dp_replicate or ep yet (set them to 1)")
        if self.dp_shard % self.ep:
            raise ValueError(f"parallelism.ep={self.ep} must divide parallelism.dp_shard={self.dp_shard} "
                             "(expert parallelism borrows data-parallel ranks)")

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of expert weights (the dp_shard ranks not used for EP)."""
        return self.dp_shard // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP also sums the gradients of the context-parallel ranks."""
        return self.dp * self.cp > 1

    def validate_for(self, config: Qwen35Config) -> None:
        """Raise if the model cannot be split this way, naming the config key and the rule."""
        if self.tp > 1:
            for key in ("num_attention_heads", "num_key_value_heads", "linear_num_key_heads",
                        "linear_num_value_heads", "vocab_size"):
                value = getattr(config, key)
                if value % self.tp:
                    raise ValueError(f"parallelism.tp={self.tp} must divide Qwen35Config.{key}={value} "
                                     "(tensor parallelism splits it evenly across ranks)")
            if not config.is_moe and config.intermediate_size % self.tp:
                raise ValueError(f"parallelism.tp={self.tp} must divide Qwen35Config.intermediate_size="
                                 f"{config.intermediate_size}")
        if self.ep > 1:
            if not config.is_moe:
                raise ValueError(f"parallelism.ep={self.ep} needs an MoE config (Qwen35Config.num_experts > 0)")
            if config.num_experts % self.ep:
                raise ValueError(f"parallelism.ep={self.ep} must divide Qwen35Config.num_experts="
                                 f"{config.num_experts} (each rank holds the same number of experts)")

    def build_meshes(self, device_type: str) -> "ParallelMeshes":
        world = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                 mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
        # dim by index: torch 2.11 rejects every dim given by name (its check is inverted)
        with_ep = world._unflatten(2, (self.efsdp, self.ep), ("efsdp", "ep"))
        hsdp = self.dp_replicate > 1
        return ParallelMeshes(
            dp=world["dp_replicate", "dp_shard"]._flatten("dp"),
            fsdp=(world["dp_replicate", "dp_shard"] if hsdp
                  else world["dp_shard", "cp"]._flatten("dp_shard_cp") if self.cp > 1 else world["dp_shard"]),
            expert_fsdp=with_ep["dp_replicate", "efsdp"] if hsdp else with_ep["efsdp"],
            ep=with_ep["ep"],
            tp=world["tp"],
            cp=world["cp"],
            pp=world["pp"],
            stage=world["dp_replicate", "dp_shard", "cp", "tp"]._flatten("stage"),
        )


@dataclass(frozen=True)
class ParallelMeshes:
    dp: DeviceMesh  # every data-parallel rank (different data): loss averaging, data loading
    fsdp: DeviceMesh  # dense parameters: dp_shard, or dp_replicate x dp_shard (HSDP)
    expert_fsdp: DeviceMesh  # expert parameters: efsdp, or dp_replicate x efsdp
    ep: DeviceMesh
    tp: DeviceMesh
    cp: DeviceMesh  # ranks holding consecutive slices of the same sequences
    pp: DeviceMesh  # the ranks holding the pipeline stages, one per stage position
    stage: DeviceMesh  # every rank of this rank's pipeline stage(s) (the world without pipeline parallelism)
