"""Checks on torchtitan DCP checkpoints before they are read, so a damaged or model-only checkpoint fails with
the step folder, the file and what to do instead of a bare `EOFError` or `Missing key ... dataloader.dp_rank_0`.

DCP reads `.metadata` with pickle: only read checkpoints from a trusted source."""

from __future__ import annotations

import re
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

STEP_DIR = re.compile(r"step-(\d+)")
METADATA = ".metadata"
# Top-level checkpoint keys (torchtitan's) besides the model weights: what resuming a run needs.
TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


class CheckpointError(ValueError):
    pass


def read_metadata(step_dir: Path) -> Metadata:
    """The DCP metadata of a step folder; an absent (FileNotFoundError) or unreadable `.metadata` names the file."""
    path = step_dir / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{step_dir}: not a DCP checkpoint directory (no {METADATA})")
    try:
        return dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception as err:  # unpickling damaged bytes can raise almost any exception type
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err}); the file is "
                              "truncated or corrupt") from None


def check_complete(step_dir: Path) -> Metadata:
    """The metadata, once every data file it points to exists and is as long as the metadata says."""
    metadata = read_metadata(step_dir)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint metadata lists it)")
        size = path.stat().st_size
        if size < length:
            raise CheckpointError(f"{path}: truncated ({size} bytes, the checkpoint metadata needs {length})")
    return metadata


def step_dirs(folder: Path) -> dict[int, Path]:
    """step -> step folder of a checkpoint folder (as torchtitan names them: step-N)."""
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): path for path in folder.iterdir() if (m := STEP_DIR.fullmatch(path.name))}


def check_step(folder: Path, step: int) -> Metadata:
    """check_complete for folder/step-N; the error says which earlier steps are complete."""
    steps = step_dirs(folder)
    try:
        return check_complete(steps[step])
    except (CheckpointError, FileNotFoundError) as err:
        earlier = [s for s in sorted(steps, reverse=True) if s < step and _is_complete(steps[s])]
        hint = (f"step {earlier[0]} ({steps[earlier[0]]}) is complete: remove {steps[step]} to resume from it"
                if earlier else "no earlier complete step exists in " + str(folder))
        raise CheckpointError(f"checkpoint step {step} is damaged: {err}; {hint}") from None


def _is_complete(step_dir: Path) -> bool:
    try:
        check_complete(step_dir)
    except (CheckpointError, FileNotFoundError):
        return False
    return True


def check_resumable(folder: Path, load_step: int, excluded: list[str], training_steps: int) -> None:
    """Before torchtitan resumes from `folder` (its latest step-N with a .metadata, or `load_step`): that step is
    complete and holds the training state a continued run needs (a final checkpoint saved with
    `last_save_model_only` holds only the model)."""
    steps = step_dirs(folder)
    if load_step == -1:
        candidates = [s for s, path in steps.items() if (path / METADATA).is_file()]
        if not candidates:
            return  # a fresh start: torchtitan loads nothing from this folder
        load_step = max(candidates)
    if load_step == 0 or load_step not in steps:
        return  # step 0 is a model-only seed checkpoint by design; a missing load_step is torchtitan's error
    metadata = check_step(folder, load_step)
    stored = {key.split(".")[0] for key in metadata.state_dict_metadata}
    lacking = [key for key in TRAINING_STATE if key not in excluded and key not in stored]
    if lacking:
        finished = (f"the run already reached step {load_step} of [training] steps = {training_steps}; "
                    if load_step >= training_steps else "")
        raise CheckpointError(
            f"{steps[load_step]} holds only the model weights (no {', '.join(lacking)}): it is the final "
            f"checkpoint of a finished run ([checkpoint] last_save_model_only = true), which cannot be resumed. "
            f"{finished}To train on from these weights, start a new run with --checkpoint.initial_load_path "
            f"{steps[load_step]} --checkpoint.initial_load_model_only true and another --job.dump_folder (or "
            f"--checkpoint.folder); to make the final checkpoint resumable, set --checkpoint.last_save_model_only "
            f"false")
