"""torchtitan's Trainer with two guards against silently wrong results:

- non-finite loss: torchtitan checks the loss only on logging steps, so with log_freq 5 and interval 1 it saved
  checkpoints full of NaN and `keep_latest_k` then purged the last finite one. Every step's loss is checked on
  device (no host sync per step); the flag is read before any checkpoint save and on logging steps, and a
  non-finite loss stops the run naming the first step that had one, before anything is saved.
- resuming: the checkpoint torchtitan is about to resume from is checked first (torchtitan_ext.checkpoint), so a
  truncated file or a model-only final checkpoint fails with the folder, the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens) -> torch.Tensor:
        loss = super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)
        finite = torch.isfinite(loss.detach()).all()
        self.first_nonfinite_step = torch.where(finite, self.first_nonfinite_step,
                                                self.first_nonfinite_step.clamp(max=self.step))
        return loss

    def train_step(self, data_iterator) -> None:
        if self.metrics_processor.should_log(self.step):
            self.stop_if_loss_was_nonfinite()  # earlier steps; torchtitan's own logging check covers this one
        super().train_step(data_iterator)
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
