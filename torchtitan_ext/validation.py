"""Value checks on a built torchtitan `Trainer.Config`, run before any work: nonsense values (negative learning
rate, zero steps, a tensor-parallel degree the world size cannot hold) fail here with `[section] key`, the value
and the rule, instead of training uphill, failing at step 1 or stopping on a bare assertion inside torchtitan.
Types and unknown keys are checked earlier, by the TOML front end."""

from __future__ import annotations

import math

from torchtitan.trainer import Trainer

from parallelism import ParallelDims
from parallelism.context_parallel import ContextParallel

from .toml_config import ConfigError

# torchtitan's [parallelism] key -> our ParallelDims field
_DEGREES = {"data_parallel_replicate_degree": "dp_replicate", "data_parallel_shard_degree": "dp_shard",
            "tensor_parallel_degree": "tp", "expert_parallel_degree": "ep"}
_UNSPLIT_DEGREES = ("pipeline_parallel_degree", "context_parallel_degree")


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {rule}")


def _positive_int(section, key: str, label: str) -> None:
    value = getattr(section, key)
    _require(value >= 1, f"[{label}] {key}", value, "must be a positive integer")


def _check_training(config: Trainer.Config) -> None:
    training = config.training
    for key in ("steps", "local_batch_size", "seq_len"):
        _positive_int(training, key, "training")
    _require(math.isfinite(training.max_norm) and training.max_norm > 0, "[training] max_norm", training.max_norm,
             "must be a positive number (gradients are clipped to this norm; 0 would zero them)")
    _require(training.global_batch_size == -1 or training.global_batch_size >= 1, "[training] global_batch_size",
             training.global_batch_size, "must be a positive integer, or -1 for local_batch_size x data-parallel degree")


def _check_optimizer(config: Trainer.Config) -> None:
    for group in config.optimizer.param_groups:
        kwargs = group.optimizer_kwargs
        if "lr" in kwargs:
            _require(math.isfinite(kwargs["lr"]) and kwargs["lr"] >= 0, "[optimizer] lr", kwargs["lr"],
                     "must be >= 0 (a negative learning rate trains uphill)")
        if "betas" in kwargs:
            _require(all(0 <= beta < 1 for beta in kwargs["betas"]), "[optimizer] betas", kwargs["betas"],
                     "each must be in [0, 1)")
        if "eps" in kwargs:
            _require(kwargs["eps"] > 0, "[optimizer] eps", kwargs["eps"], "must be > 0")
        if "weight_decay" in kwargs:
            _require(math.isfinite(kwargs["weight_decay"]) and kwargs["weight_decay"] >= 0,
                     "[optimizer] weight_decay", kwargs["weight_decay"], "must be >= 0")


def _check_lr_scheduler(config: Trainer.Config) -> None:
    scheduler = config.lr_scheduler
    _require(scheduler.warmup_steps >= 0, "[lr_scheduler] warmup_steps", scheduler.warmup_steps, "must be >= 0")
    _require(scheduler.total_steps is None or scheduler.total_steps >= 1, "[lr_scheduler] total_steps",
             scheduler.total_steps, "must be a positive integer (unset: [training] steps)")
    _require(scheduler.decay_ratio is None or 0 <= scheduler.decay_ratio <= 1, "[lr_scheduler] decay_ratio",
             scheduler.decay_ratio, "must be in [0, 1]")
    _require(0 <= scheduler.min_lr_factor <= 1, "[lr_scheduler] min_lr_factor", scheduler.min_lr_factor,
             "must be in [0, 1]")


def _check_checkpoint_and_metrics(config: Trainer.Config) -> None:
    """(torchtitan's CheckpointManager.Config checks interval and keep_latest_k itself.)"""
    checkpoint = config.checkpoint
    _require(checkpoint.enable or not checkpoint.initial_load_path, "[checkpoint] initial_load_path",
             checkpoint.initial_load_path, "is only read when [checkpoint] enable = true (with enable = false the "
             "run would start from random weights); set --checkpoint.enable true")
    _positive_int(config.metrics, "log_freq", "metrics")


def _check_parallelism(config: Trainer.Config, world_size: int) -> None:
    parallelism = config.parallelism
    for key in (*_DEGREES, *_UNSPLIT_DEGREES):
        value = getattr(parallelism, key)
        allowed = value >= 1 or (key == "data_parallel_shard_degree" and value == -1)
        _require(allowed, f"[parallelism] {key}", value,
                 "must be a positive integer" + (" or -1 (the ranks left over)" if key.endswith("shard_degree") else ""))
    degrees = {key: getattr(parallelism, key) for key in _DEGREES}
    described = ", ".join(f"{key} = {value}" for key, value in degrees.items() if value != 1)
    unsplit = math.prod(getattr(parallelism, key) for key in _UNSPLIT_DEGREES)
    if world_size % unsplit:
        raise ConfigError(f"[parallelism] pipeline_parallel_degree x context_parallel_degree = {unsplit} must divide "
                          f"the number of processes {world_size} (WORLD_SIZE)")
    try:
        dims = ParallelDims(**{field: degrees[key] for key, field in _DEGREES.items()}, world_size=world_size // unsplit)
        dims.validate_for(config.model_spec.model.architecture)
    except ValueError as err:
        raise ConfigError(f"[parallelism] {described or 'all degrees 1'} on {world_size} process(es) "
                          f"(WORLD_SIZE): {err}") from None
    _check_context_parallel(config)
    if parallelism.pipeline_parallel_degree > 1:
        _require(parallelism.context_parallel_degree == 1, "[parallelism] context_parallel_degree",
                 parallelism.context_parallel_degree, "must be 1 with pipeline_parallel_degree > 1 (context "
                 "parallelism shards each microbatch in the trainer, which the pipeline schedule bypasses; untested)")
    global_batch = config.training.global_batch_size
    per_step = config.training.local_batch_size * dims.dp
    _require(global_batch == -1 or global_batch % per_step == 0, "[training] global_batch_size", global_batch,
             f"must be a multiple of local_batch_size x data-parallel degree = {per_step}")


def _check_context_parallel(config: Trainer.Config) -> None:
    """Context parallelism gives each rank two chunks of seq_len / (2 x degree) tokens (parallelism.context_parallel),
    each at least a conv window long; the MTP head's one-token shift would cross the chunks."""
    degree = config.parallelism.context_parallel_degree
    if degree == 1:
        return
    seq_len, chunks, min_chunk = config.training.seq_len, 2 * degree, ContextParallel.MAX_CONV_WIDTH - 1
    _require(seq_len % chunks == 0 and seq_len // chunks >= min_chunk, "[training] seq_len", seq_len,
             f"must be a multiple of 2 x [parallelism] context_parallel_degree = {chunks} and at least "
             f"{chunks * min_chunk}: context parallelism gives each rank two chunks of seq_len / {chunks} tokens, "
             f"each at least {min_chunk} (a conv window)")
    mtp_loss_weight = config.model_spec.model.architecture.mtp_loss_weight
    _require(not mtp_loss_weight, "[model] mtp_loss_weight", mtp_loss_weight,
             f"the MTP head does not compose with [parallelism] context_parallel_degree = {degree} yet (its "
             "one-token shift crosses the ranks' chunks); train it with context_parallel_degree = 1")



def validate(config: Trainer.Config, world_size: int) -> None:
    """Raise ConfigError on the first value no run could use, naming `[section] key`, the value and the rule.
    world_size: processes in the job (torchrun's WORLD_SIZE; 1 without torchrun)."""
    _check_training(config)
    _check_optimizer(config)
    _check_lr_scheduler(config)
    _check_checkpoint_and_metrics(config)
    _check_parallelism(config, world_size)
