"""Parallelism and training transforms for the qwen35 model: TP/SP, EP, float8, activation checkpointing,
per-block torch.compile and FSDP2/HSDP. Plain torch + torchao; no torchtitan."""

from .parallel_dims import ParallelDims, ParallelMeshes
from .parallelize import ParallelizeRecord, ParallelizeSettings, parallelize

__all__ = ["ParallelDims", "ParallelMeshes", "ParallelizeRecord", "ParallelizeSettings", "parallelize"]
