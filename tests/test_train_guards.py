"""Trainer guards (issue 14 items 5, 9, 11): a non-finite loss stops the run before anything non-finite is saved
and without purging finite checkpoints; a truncated or model-only checkpoint fails with its folder, file and
what to do, before training."""

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

from test_train_helpers import debug_args, run_instrumented, train
from torchtitan_ext.checkpoint import CheckpointError, check_resumable
from torchtitan_ext.train import load_config
from torchtitan_ext.trainer import NonFiniteLossError

TINY = ("--training.seq_len", "32", "--training.local_batch_size", "2", "--lr_scheduler.warmup_steps", "1",
        "--metrics.enable_tensorboard", "false")


def _finite(step_dir) -> bool:
    metadata = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in metadata.items()
             if key.startswith("model.")}
    dcp.load(state, checkpoint_id=str(step_dir))
    return len(state) > 0 and all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_loss_stops_before_saving_and_keeps_the_finite_checkpoints(tmp_path):
    # Logging every 5 steps, saving every step, keeping 2: torchtitan saved NaN steps 3 and 4 and purged 1 and 2.
    config = load_config(debug_args(tmp_path, *TINY, "--training.steps", "4", "--metrics.log_freq", "5",
                                    "--checkpoint.enable", "true", "--checkpoint.interval", "1",
                                    "--checkpoint.keep_latest_k", "2"))

    def poison_step_3(trainer):
        step = trainer.train_step

        def poisoned(data_iterator):
            if trainer.step == 3:
                with torch.no_grad():
                    next(trainer.model_parts[0].parameters()).fill_(math.nan)
            step(data_iterator)

        trainer.train_step = poisoned

    with pytest.raises(NonFiniteLossError, match="not finite .* at step 3; stopped at step 3 without saving"):
        run_instrumented(config, on_build=poison_step_3)
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]
    assert _finite(folder / "step-1") and _finite(folder / "step-2")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_model_only_final_and_truncated_checkpoints_are_named(tmp_path):
    common = (*TINY, "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "1")
    train(tmp_path, *common)
    folder = tmp_path / "checkpoint"
    # Rerunning the finished command: torchtitan failed with "Missing key ... dataloader.dp_rank_0".
    with pytest.raises(CheckpointError, match=r"step-2 holds only the model weights \(no optimizer, lr_scheduler, "
                                              r"dataloader, train_state\).*already reached step 2 of \[training\] "
                                              r"steps = 2.*--checkpoint.initial_load_path .*step-2"):
        train(tmp_path, *common)
    # Raising --training.steps: the same message without "already reached".
    with pytest.raises(CheckpointError, match=r"step-2 holds only the model weights") as raised:
        check_resumable(folder, -1, [], 5)
    assert "already reached" not in str(raised.value)

    data_file = next(p for p in (folder / "step-2").iterdir() if p.suffix == ".distcp")
    _truncate(data_file)
    with pytest.raises(CheckpointError, match=rf"step 2 is damaged: {data_file}: truncated \(\d+ bytes, the "
                                              rf"checkpoint metadata needs \d+\); step 1 \(.*step-1\) is complete"):
        check_resumable(folder, -1, [], 5)
    _truncate(folder / "step-1" / ".metadata")
    with pytest.raises(CheckpointError, match=r"step 1 is damaged: .*step-1/.metadata: unreadable checkpoint "
                                              r"metadata .*; no earlier complete step exists"):
        check_resumable(folder, 1, [], 5)
