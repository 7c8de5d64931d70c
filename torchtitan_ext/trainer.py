"""torchtitan's Trainer with what Qwen3.5 training needs on top:

- non-finite loss: torchtitan checks the loss only on logging steps, so with log_freq 5 and interval 1 it saved
  checkpoints full of NaN and `keep_latest_k` then purged the last finite one. Every step's loss is checked on
  device (no host sync per step); the flag is read before any checkpoint save and on logging steps, and a
  non-finite loss stops the run naming the first step that had one, before anything is saved.
- resuming: the checkpoint torchtitan is about to resume from is checked first (torchtitan_ext.checkpoint), so a
  truncated file or a model-only final checkpoint fails with the folder, the file and what to do.
- pipeline parallelism with tied embeddings or the MTP loss (parallelism.pipeline.EmbeddingCopies): the gradient
  of the last stage's copy of the embedding (tied lm_head, or the MTP head's embedding) is added to the first
  stage's embedding gradient after each forward-backward, before torchtitan clips the gradient norm; the first
  stage's weights are copied to the last after each optimizer step. The last stage's MTP head gets each
  microbatch's input ids as the keyword `mtp_input_ids`.
- context parallelism: torchtitan shards a context-parallel batch with torch's `context_parallel` (round-robin load
  balancing of the sequence), which fits attention but not a recurrence. Under `[parallelism]
  context_parallel_degree = C`, the Qwen3.5 parallelize function gives the model a `context_parallel`
  (`parallelism.context_parallel`) instead, and each CP rank gets its two chunks of T / 2C tokens (chunks r and
  2C - 1 - r, for balanced attention): input ids, labels, positions and cu_seqlens of the packed row. Everything
  else is torchtitan's: the CP ranks read the same batch (its data-parallel "batch" mesh excludes them), the loss is
  normalised by the valid tokens of the whole (unsplit) global batch, FSDP shards over dp_shard x cp and sums their
  partial gradients, and the logged loss sums over the data-parallel and CP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.trainer import Trainer

from .checkpoint import check_resumable

_NO_STEP = torch.iinfo(torch.int64).max


class NonFiniteLossError(RuntimeError):
    pass


class Qwen35Trainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        # The first step whose loss was NaN or inf on this rank (_NO_STEP: none), kept on device.
        self.first_nonfinite_step = torch.full((), _NO_STEP, dtype=torch.int64, device=self.device)
        # Pipeline parallelism with tied embeddings or the MTP loss: the first and last stages' copies of the
        # embedding, made equal here (each stage initialised its own) and after every optimizer step.
        self.embedding_copies = getattr(self.model_parts[0], "embedding_copies", None)
        if self.embedding_copies is not None:
            self.embedding_copies.copy_weights()
        self.pipeline_mtp = self.parallel_dims.pp_enabled and bool(self.model_parts[0].config.mtp_loss_weight)

    def post_dataloading_process(self, input_dict: dict[str, torch.Tensor],
                                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        context_parallel = getattr(self.model_parts[0], "context_parallel", None)
        if context_parallel is None:
            inputs, labels, extra_kwargs = super().post_dataloading_process(input_dict, labels)
            if self.pipeline_mtp:  # keywords reach every stage; the last one's MTP head embeds the tokens t+1
                extra_kwargs["mtp_input_ids"] = inputs
            return inputs, labels, extra_kwargs
        if self.config.parallelism.spmd_backend != "partial_dtensor":
            raise ValueError("parallelism.context_parallel_degree > 1 needs parallelism.spmd_backend = "
                             f"'partial_dtensor', got {self.config.parallelism.spmd_backend!r}")
        inputs = input_dict["input"]
        shard = context_parallel.shard(input_dict["cu_seqlens"], inputs.shape[1])
        labels = shard.take(labels)
        self.ntokens_seen += labels.numel()  # as torchtitan counts: the tokens this rank processes
        extra_kwargs = {k: v for k, v in input_dict.items() if k not in ("input", "cu_seqlens")}
        extra_kwargs.update(cu_seqlens=shard.cu_seqlens, position_ids=shard.position_ids)
        return shard.take(inputs), labels, extra_kwargs

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens) -> torch.Tensor:
        loss = super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)
        if self.embedding_copies is not None:  # before the gradient norm and the optimizer step
            self.embedding_copies.sum_gradients()
        finite = torch.isfinite(loss.detach()).all()
        self.first_nonfinite_step = torch.where(finite, self.first_nonfinite_step,
                                                self.first_nonfinite_step.clamp(max=self.step))
        return loss

    def train_step(self, data_iterator) -> None:
        if self.metrics_processor.last_logged_step is None:  # this run's first step (torchtitan counted it already)
            self.metrics_processor.last_logged_step = self.step - 1
        if self.metrics_processor.should_log(self.step):
            self.stop_if_loss_was_nonfinite()  # earlier steps; torchtitan's own logging check covers this one
        super().train_step(data_iterator)
        if self.embedding_copies is not None:
            self.embedding_copies.copy_weights()
        # Private torchtitan call: the exact rule its train loop applies right after this step.
        if self.checkpointer._should_save(self.step, last_step=self.step == self.config.training.steps):
            self.stop_if_loss_was_nonfinite()

    def stop_if_loss_was_nonfinite(self) -> None:
        """Raise if any rank had a non-finite loss so far (one host sync; every rank must call it)."""
        first = self.first_nonfinite_step.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step != _NO_STEP:
            raise NonFiniteLossError(
                f"the loss was not finite (NaN or inf) at step {step}; stopped at step {self.step} without saving a "
                "checkpoint of this state (the checkpoints already saved are from finite steps). Lower "
                "[optimizer] lr, check the data, or resume from the last checkpoint")

    def train(self) -> None:
        checkpoint = self.config.checkpoint
        if checkpoint.enable:
            check_resumable(Path(self.checkpointer.folder), checkpoint.load_step, checkpoint.exclude_from_loading,
                            self.config.training.steps)
        super().train()
